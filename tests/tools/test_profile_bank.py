"""tools/profile.py bank: per-sample against shared negatives on tiny sizes; JSON keys, deviation, errors."""
import json

import pytest

from pirl_trainer.tools.profile import main
from pirl_trainer.tools.profiling.bank import VARIANTS, profile_bank

TINY = ["--rows", "500", "--dim", "16", "--batch", "4", "--negatives", "50", "--repeats", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


def test_bank_writes_the_ratio_and_settings(tmp_path, capsys):
    out = tmp_path / "bank.json"
    assert main(["bank", *TINY, "--threads", "1,2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"per_sample_ms", "shared_ms", "ratio", "rows", "dim", "batch", "negatives", "dtype", "threads",
            "repeats", "device", "per_sample_method", "bank_bytes", "bank_bytes_fp32", "results",
            "deviation_vs_fp32", "command"} <= result.keys()
    assert (result["rows"], result["dim"], result["batch"], result["negatives"]) == (500, 16, 4, 50)
    assert result["dtype"] == "float32" and result["threads"] == [1, 2] and result["deviation_vs_fp32"] is None
    assert result["per_sample_method"] == "gather"  # 500 rows > 8 * 50: the dense product is not worth it
    assert result["ratio"] == pytest.approx(result["per_sample_ms"] / result["shared_ms"])
    assert result["bank_bytes"] == result["bank_bytes_fp32"] == 500 * 16 * 4
    assert result["command"].startswith("python tools/profile.py bank --rows 500")
    assert "reference_vissl_forward_ms" not in result  # only at the sizes it was measured at
    assert [r["threads"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        assert set(r["variants"]) == set(VARIANTS) and r["draw_generator_ms"] > 0
        for v in r["variants"].values():
            assert v["total_ms"] > 0
            assert v["total_ms"] == pytest.approx(v["draw_ms"] + v["fetch_ms"] + v["loss_ms"])
        variants = r["variants"]
        assert r["ratio"] == pytest.approx(variants["per_sample"]["total_ms"] / variants["shared"]["total_ms"])
    first = result["results"][0]["variants"]
    assert result["per_sample_ms"] == first["per_sample"]["total_ms"]
    assert "per_sample (gather) / shared" in capsys.readouterr().out


def test_bank_in_bfloat16_reports_half_the_memory_and_the_loss_deviation(capsys):
    result = profile_bank(500, 16, 4, 50, "bfloat16", [1], 1)
    assert result["bank_bytes"] * 2 == result["bank_bytes_fp32"]
    for mode in ("shared", "per_sample"):
        d = result["deviation_vs_fp32"][mode]
        assert 0 < d["loss_rel_diff"] < 1e-2 and 0 < d["grad_rel_diff"] < 5e-2
        assert d["loss"] == pytest.approx(d["loss_fp32"], rel=1e-2)


def test_bank_picks_the_dense_product_for_a_small_bank_and_skips_what_does_not_fit(monkeypatch):
    from pirl_trainer.tools.profiling import bank

    monkeypatch.setattr(bank, "MAX_TEMP_BYTES", 4 * 50 * 16 * 4 - 1)  # just below the materialised (B, K, D)
    result = profile_bank(150, 16, 4, 50, "float32", [1], 1)
    assert result["per_sample_method"] == "dense"
    variants = result["results"][0]["variants"]
    assert variants["per_sample_materialised"] is None and result["results"][0]["ratio_materialised"] is None
    assert variants["per_sample_dense"] is not None


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "float64"], "--dtype"),
    (["--negatives", "497"], "--negatives"),
    (["--rows", "4"], "--rows"),
    (["--batch", "0"], "--batch"),
    (["--threads", "0"], "--threads"),
])
def test_bank_usage_errors(argv, message, capsys):
    assert main(["bank", *TINY, *argv]) == 2
    assert message in capsys.readouterr().err


def test_bank_help(profile_help):
    out = profile_help("bank")
    assert "--negatives" in out and "--dtype" in out
