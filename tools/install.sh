#!/usr/bin/env bash
# The project's install steps, in one place for .ci/run and the Dockerfile, so that they cannot drift.
#
#   tools/install.sh system [--clean]   the apt packages ffcv builds against (as root, or through sudo);
#                                       --clean removes apt's package lists afterwards (container images)
#   tools/install.sh python [SPEC]      pip-installs the project into the active Python, SPEC defaulting to
#                                       ".[test,dali,ffcv]", torch and torchvision at constraints.txt's versions
set -euo pipefail
cd "$(dirname "$0")/.."

# ffcv builds from source against these (DEPENDENCIES.md: "Could not find required package: opencv4" without them).
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev)

case "${1:-}" in
    system)
        if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
        export DEBIAN_FRONTEND=noninteractive
        "${SUDO[@]}" apt-get update -qq
        "${SUDO[@]}" apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
        if [ "${2:-}" = "--clean" ]; then "${SUDO[@]}" rm -rf /var/lib/apt/lists/*; fi
        ;;
    python)
        python -m pip install -q --upgrade pip
        python -m pip install -q -c constraints.txt -e "${2:-.[test,dali,ffcv]}"
        ;;
    *)
        echo "usage: tools/install.sh system [--clean] | python [SPEC]" >&2
        exit 2
        ;;
esac
