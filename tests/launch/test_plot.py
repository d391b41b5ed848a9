"""`vfl plot`: a PNG of the learning curves from a run folder's model/metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from vfl.launch.plot import PlotError, load_metrics, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


needs_matplotlib = pytest.mark.skipif(not _has_matplotlib(),
                                      reason="matplotlib is not installed (pip install 'vfl[plot]')")


def write_metrics(run, records) -> None:
    (run / "model").mkdir(parents=True, exist_ok=True)
    (run / "model" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def binary_epochs(n: int = 6) -> list[dict]:
    return [{"epoch": e + 1, "step": 10 * (e + 1), "train_loss": 0.7 / (e + 1), "val_loss": 0.6 / (e + 1) + 0.01,
             "train_accuracy": 0.7 + 0.04 * e, "val_accuracy": 0.72 + 0.035 * e,
             "train_auc": 0.8 + 0.03 * e, "val_auc": 0.82 + 0.025 * e} for e in range(n)]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5000  # two panels with curves, not an empty canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 300


@needs_matplotlib
def test_plot_writes_a_png_into_the_run_folder(tmp_path):
    write_metrics(tmp_path, binary_epochs())
    (tmp_path / "summary.json").write_text(json.dumps({"demo": "breast", "ok": True}))
    out = plot_run(tmp_path)
    assert out == tmp_path / "learning-curves.png"
    assert_png(out)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the atomic write left nothing behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of the temporary file


@needs_matplotlib
@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_plot_other_tasks_and_out(tmp_path, task):
    if task == "multiclass":
        records = [{"epoch": e + 1, "train_loss": 2.0 / (e + 1), "val_loss": 1.5 / (e + 1),
                    "train_accuracy": 0.5 + 0.1 * e, "val_accuracy": 0.55 + 0.1 * e} for e in range(4)]
    else:
        records = [{"epoch": e + 1, "train_loss": 4.0 / (e + 1), "val_loss": 3.0 / (e + 1),
                    "train_rmse": math.sqrt(4.0 / (e + 1)), "val_rmse": math.sqrt(3.0 / (e + 1))} for e in range(50)]
    write_metrics(tmp_path, records)
    out = plot_run(tmp_path, tmp_path / "elsewhere" / "curves.png")
    assert out == tmp_path / "elsewhere" / "curves.png"
    assert_png(out)


@needs_matplotlib
def test_cli_plot(tmp_path):
    write_metrics(tmp_path, binary_epochs(3))
    done = subprocess.run([sys.executable, "-m", "vfl", "plot", str(tmp_path), "--out", str(tmp_path / "c.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "c.png")


def test_missing_or_empty_metrics_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vfl", "plot", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "metrics.jsonl" in done.stderr, done.stderr
    write_metrics(tmp_path, [])
    done = subprocess.run([sys.executable, "-m", "vfl", "plot", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no epochs" in done.stderr, done.stderr
    assert not (tmp_path / "learning-curves.png").exists()


def test_without_matplotlib_says_how_to_install(tmp_path):
    write_metrics(tmp_path, binary_epochs(2))
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # every `import matplotlib...` now raises ImportError
            "from vfl.cli import main\n"
            f"main(['plot', {str(tmp_path)!r}])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "vfl plot: needs matplotlib: pip install 'vfl[plot]'\n"


def test_load_metrics_keeps_the_last_record_of_a_repeated_epoch(tmp_path):
    records = binary_epochs(3) + [{**binary_epochs(3)[2], "val_loss": 0.123}]  # a resumed run re-ran epoch 2
    write_metrics(tmp_path, records)
    epochs = load_metrics(tmp_path / "model" / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and epochs[2]["val_loss"] == 0.123
    (tmp_path / "model" / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(PlotError, match="line 2 is not JSON"):
        load_metrics(tmp_path / "model" / "metrics.jsonl")
