"""What a backend says when it cannot run here: BackendUnavailable, and what to install for each optional backend.

A module of its own so that the backends, pipelines/device_decode.py and pipelines/__init__.py (which re-exports
the error as `pipelines.BackendUnavailable`) all raise the same class without importing one another.
"""


class BackendUnavailable(RuntimeError):
    """A backend was chosen whose package or device is not available here; the message says what to do."""


# What each optional backend needs installed (DEPENDENCIES.md), quoted by the BackendUnavailable it raises.
DALI_INSTALL_HINT = "pip install nvidia-dali-cuda130 (DEPENDENCIES.md); or choose data.backend=reference"
FFCV_INSTALL_HINT = ('the FFCV backend needs the ffcv package: apt-get install -y pkg-config libturbojpeg0-dev '
                     'libopencv-dev, then pip install -e ".[ffcv]" (or pip install ffcv)')
