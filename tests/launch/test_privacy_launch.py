"""The label-leakage audit in what a run leaves for its user: the plot's own leakage panel, summary.json's ``leak``
and ``defence``, the demo's closing line, and ``vfl demo --defence`` (checked before anything is written)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vfl.launch.demo import DemoError, leak_line, prepare_demo, privacy_table
from vfl.launch.local import leak_by_party
from vfl.launch.plot import _leak_series, plot_run

from .test_plot import assert_png, binary_epochs, needs_matplotlib, write_metrics


def audited_epochs(n: int = 5) -> list[dict]:
    return [{**r, "leak_auc_norm": {"dh1": 0.9 - 0.05 * i, "dh2": 0.7}, "leak_auc_direction": {"dh1": 0.99, "dh2": 0.6}}
            for i, r in enumerate(binary_epochs(n))]


def test_the_leak_series_are_per_party_and_figure():
    series = _leak_series(audited_epochs(3))
    assert [(party, key) for party, key, _, _ in series] == [
        ("dh1", "leak_auc_norm"), ("dh1", "leak_auc_direction"), ("dh2", "leak_auc_norm"), ("dh2", "leak_auc_direction")]
    assert series[0][3] == pytest.approx([0.9, 0.85, 0.8])
    assert _leak_series(binary_epochs(3)) == []  # a run without the audit: no panel


@needs_matplotlib
def test_an_audited_run_gets_a_third_panel(tmp_path):
    write_metrics(tmp_path / "plain", binary_epochs())
    write_metrics(tmp_path / "audited", audited_epochs())
    widths = []
    for name in ("plain", "audited"):
        out = plot_run(tmp_path / name)
        assert_png(out)
        widths.append(int.from_bytes(out.read_bytes()[16:20], "big"))
    assert widths[1] > widths[0] * 1.3  # the leakage axis of its own, beside the loss and the quality panels


def test_the_summary_and_the_closing_line_carry_the_last_epochs_leak():
    last = audited_epochs()[-1]
    leak = leak_by_party(last)
    assert leak == {"dh1": {"leak_auc_norm": last["leak_auc_norm"]["dh1"], "leak_auc_direction": 0.99},
                    "dh2": {"leak_auc_norm": 0.7, "leak_auc_direction": 0.6}}
    assert leak_by_party(binary_epochs()[-1]) == {}
    assert leak_line({"leak": leak, "defence": "none"}) == (
        "label leakage (what each data holder could infer from its gradients): dh1 norm AUC 0.70, direction AUC "
        "0.99; dh2 norm AUC 0.70, direction AUC 0.60 — see PRIVACY.md; set [privacy].defence to reduce it")
    assert "defence marvell (sumkl 4))" in leak_line({"leak": leak, "defence": "marvell (sumkl 4)"})
    assert leak_line({"leak": {}, "defence": "none"}) is None
    multi = leak_by_party({"leak_attack_accuracy": {"dh1": 0.31}})
    assert leak_line({"leak": multi}).endswith("dh1 attack accuracy 0.31 — see PRIVACY.md; set [privacy].defence "
                                               "to reduce it")


def test_demo_defence_options_become_the_privacy_table():
    assert privacy_table("none") is None
    assert privacy_table("max_norm") == {"defence": "max_norm"}
    assert privacy_table("marvell") == {"defence": "marvell", "sumkl": 4.0}
    assert privacy_table("gradient_noise", ["sigma=0.5", " clip = 2"]) == {"defence": "gradient_noise", "clip": 2.0,
                                                                           "sigma": 0.5}
    for params, words in ((["sumkl"], "KEY=NUMBER"), (["sumkl=lots"], "KEY=NUMBER"), (["epsilon=1"], "sumkl"),
                          (["sumkl=-1"], "sumkl")):
        with pytest.raises(DemoError, match=words):
            privacy_table("marvell", params)


def test_every_demo_node_gets_the_privacy_table(tmp_path):
    demo = prepare_demo("breast", tmp_path, privacy={"defence": "marvell", "sumkl": 2.0})
    for path in demo.configs.values():
        assert '[privacy]\ndefence = "marvell"\nsumkl = 2.0\n' in path.read_text()
    with pytest.raises(DemoError, match="binary"):
        prepare_demo("digits", tmp_path / "digits", privacy={"defence": "marvell"})


def test_vfl_demo_refuses_a_wrong_defence_parameter_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vfl", "demo", "--out", str(out), "--defence", "marvell",
                           "--defence-param", "epsilon=1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "vfl demo: --defence marvell:" in done.stderr and "sumkl" in done.stderr
    assert not out.exists()
