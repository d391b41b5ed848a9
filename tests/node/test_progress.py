"""The label holder's progress display: a redrawn bar on a terminal, a few plain lines otherwise."""

import io

from vfl.node.progress import Progress


def test_plain_lines_at_each_quarter_of_an_epoch_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(out, tty=False, batch_size=10)
    for done in range(1, 9):
        p.update(0, done, 8, 0.5, now=float(done))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("  epoch 1: 8/8 steps") and "loss 0.5000" in lines[-1]


def test_a_bar_redrawn_in_place_on_a_terminal_and_closed_at_the_end_of_the_epoch():
    out = io.StringIO()
    p = Progress(out, tty=True, batch_size=10)
    for done in range(1, 5):
        p.update(2, done, 4, 0.25, now=float(done))
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and "epoch 3 [" in text and "4/4 steps" in text
