"""The README's main job runs end to end (shortened) and learns."""

from experiments import quickstart


def test_quickstart_short_run(tmp_path):
    out = tmp_path / "qs.png"
    result = quickstart.main(["--epochs", "1", "--width", "256", "--r", "16", "--out", str(out)])
    assert out.exists() and out.stat().st_size > 10_000
    # one epoch on digits: far above chance (0.1) for both widths
    assert result["infinite"] > 0.3 and result["finite"] > 0.3
