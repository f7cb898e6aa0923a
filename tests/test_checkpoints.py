"""Checkpoints survive a kill during a save; resume takes the newest readable checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from ignite.engine import Engine

from common.bundle import latest_checkpoint
from common.handlers.checkpoint import AtomicCheckpointSaver


def _trainer(net, history=None):
    def step(engine, batch):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        if history is not None:  # the exact float32 weights after each step, to compare bit for bit
            history.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return 0.0

    return Engine(step)


def test_previous_checkpoint_kept_until_the_next_is_complete(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    history = []
    engine = _trainer(net, history)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_interval=1, epoch_level=True, n_saved=1)
    saver.attach(engine)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):  # the third save dies half-way through writing its file
        calls["n"] += 1
        if calls["n"] == 3:
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    try:
        engine.run([0], max_epochs=3)
    except KeyboardInterrupt:
        pass
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["model_epoch=2.pt"], files  # epoch 1 removed after epoch 2 was complete; no partial file
    state = torch.load(tmp_path / "model_epoch=2.pt", weights_only=True)
    assert len(history) == 3  # the 3rd step ran, its save died
    for k in ("weight", "bias"):  # the file holds exactly the weights after 2 epochs, not after 1 or 3
        assert torch.equal(state[k], history[1][k]), k
        assert not torch.equal(state[k], history[2][k]) and not torch.equal(state[k], history[0][k]), k
    assert latest_checkpoint(tmp_path, "model_*.pt") == str(tmp_path / "model_epoch=2.pt")


def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, caplog):
    torch.save({"model": {}}, tmp_path / "checkpoint_epoch=3.pt")
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(b"")  # a 0-byte file from a killed in-place save
    (tmp_path / "checkpoint_epoch=5.pt").write_bytes(open(tmp_path / "checkpoint_epoch=3.pt", "rb").read()[:200])
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=3.pt")
    assert "checkpoint_epoch=5.pt" in caplog.text and "checkpoint_epoch=4.pt" in caplog.text


def test_kill_during_a_checkpoint_write(tmp_path):
    """A real SIGKILL of a process blocked inside torch.save of its second checkpoint: the first
    checkpoint is still there and readable, nothing else is left but a hidden temporary file."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from ignite.engine import Engine
        from common.handlers.checkpoint import AtomicCheckpointSaver
        net = torch.nn.Linear(2, 2)
        engine = Engine(lambda e, b: 0.0)
        AtomicCheckpointSaver({str(tmp_path / "ck")!r}, {{"model": net}}, save_interval=1, epoch_level=True,
                              n_saved=1).attach(engine)
        real = torch.save
        n = [0]
        def slow(obj, f, *a, **k):
            n[0] += 1
            if n[0] == 2:
                open(f, "wb").write(b"partial")
                print("BLOCKED", flush=True)
                time.sleep(60)
            return real(obj, f, *a, **k)
        torch.save = slow
        engine.run([0], max_epochs=3)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    try:
        deadline = time.time() + 120
        line = ""
        while "BLOCKED" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "BLOCKED" in line, "the child never reached the second save"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    visible = sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith("."))
    assert visible == ["model_epoch=1.pt"], visible
    torch.load(tmp_path / "ck" / "model_epoch=1.pt", weights_only=True)
    assert latest_checkpoint(tmp_path / "ck", "model_*.pt").endswith("model_epoch=1.pt")


def test_restarts_do_not_pile_up_checkpoints_or_temporaries(tmp_path, caplog):
    """A resumed run knows only its own files: the numbered checkpoints of the earlier run, and the
    hidden temporary a killed write left, are removed once the new run has saved."""
    import logging

    from common.handlers import ResumeLog

    net = torch.nn.Linear(2, 2)
    for n in (1, 2, 3):  # an earlier run (n_saved 1 would have kept only the last, a crash left more)
        torch.save({"model": net.state_dict()}, tmp_path / f"model_epoch={n}.pt")
    (tmp_path / ".model_epoch=4.abc123.tmp.pt").write_bytes(b"PK half")
    (tmp_path / "other_epoch=1.pt").write_bytes(b"not ours")  # another series of files is left alone
    engine = _trainer(net)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_interval=1, epoch_level=True, n_saved=1).attach(engine)
    engine.state.iteration, engine.state.epoch, engine.state.max_epochs, engine.state.epoch_length = 3, 3, 5, 1
    ResumeLog(tmp_path / "model_epoch=3.pt").attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run([0], max_epochs=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_epoch=5.pt", "other_epoch=1.pt"]
    assert f"resumed from {tmp_path / 'model_epoch=3.pt'}: continuing after iteration 3 (epoch 3 of 5" in caplog.text
    # a fresh run logs nothing of the kind
    caplog.clear()
    fresh = _trainer(net)
    ResumeLog("").attach(fresh)
    with caplog.at_level(logging.INFO):
        fresh.run([0], max_epochs=1)
    assert "resumed from" not in caplog.text
