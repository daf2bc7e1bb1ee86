"""Faults inside the training loop's own machinery, tested in-process: device copies of layouts
that must follow the layout's value, the state checksum that detects damaged checkpoints, the
config keys that may change on resume."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import cached_layout, sample_ratios
from gist_jax.gist.specs import layout_arrays
from gist_jax.train.checkpoint import Checkpointer, DiskFull
from gist_jax.train.config import MeshConfig
from gist_jax.train.loop import StepFunctions
from gist_jax.train.mesh import make_mesh


def test_device_layout_arrays_follow_the_layout_value_over_thousands_of_layouts():
    """Per-segment ratios: 4^8 layouts, far more than ``cached_layout`` keeps. Every lookup must
    return the arrays of the layout asked for (an id-keyed cache returned stale masks once ids
    were reused after eviction), and the device cache stays bounded."""
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=16, ratios=(1, 2, 4, 8),
                             ratio_sampling="per_segment")
    steps = StepFunctions(make=None, mesh=make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=[_cpu0()]),
                          on_compile=None)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(1200):
        ratios, slots = sample_ratios(comp, 8, rng)
        layout = cached_layout(8 * 16, comp, ratios, slots)
        seen.add(ratios)
        got = steps.arrays(layout)
        want = layout_arrays(layout)
        for key in ("position", "memory_position", "memory_slot", "alive", "raw_position"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=f"{key} {ratios}")
    assert len(seen) > 1000
    assert len(steps._arrays) <= StepFunctions.MAX_DEVICE_LAYOUTS


def test_layout_digest_is_by_value():
    comp = CompressionConfig(memory="kv", granularity="fine", segment_length=16, ratios=(2, 4),
                             ratio_sampling="per_segment")
    from gist_jax.gist.layout import build_layout

    a, b = build_layout(64, comp, (2, 4, 2, 4), 8), build_layout(64, comp, (2, 4, 2, 4), 8)
    c = build_layout(64, comp, (4, 2, 2, 4), 8)
    assert a is not b and a.digest == b.digest
    assert a.digest != c.digest and a.shape == c.shape


def _cpu0():
    import jax

    return jax.devices()[0]


@pytest.fixture
def tiny_state():
    from gist_jax.experiments.demo import get_config
    from gist_jax.train.experiment import run_config
    from gist_jax.train.loop import load_base_model
    from gist_jax.train.state import create_train_state

    run = run_config(get_config("tiny"))
    mesh = make_mesh(run.step.mesh)
    cfg, params = load_base_model(run.model)
    state, _, _ = create_train_state(cfg, run.compression, run.step, mesh, params)
    return run, state


def test_enospc_inside_an_orbax_save_becomes_one_disk_full_error(tiny_state, tmp_path, monkeypatch, capfd):
    """The space check before a save can be outrun (another job fills the disk meanwhile): the
    ENOSPC that Orbax's writer threads then hit surfaces as ``DiskFull`` naming the step, the
    directory and the newest complete checkpoint, and the unfinished save is removed."""
    run, state = tiny_state
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setattr(Checkpointer, "_check_space", lambda self, step, saved: None)
        ckpt = Checkpointer(disk / "checkpoints", keep=10)
        ckpt.save(1, state, {"step": 1, "fingerprint": "x"}, run.to_dict(), {})
        ckpt.wait()
        # Another job takes the space: 64 KiB stay free, far less than a checkpoint (~1 MiB).
        (disk / "other_job").write_bytes(b"\0" * (shutil.disk_usage(disk).free - (64 << 10)))
        def save_and_wait():  # the fault may surface in the save or in the wait for its threads
            ckpt.save(2, state, {"step": 2, "fingerprint": "x"}, run.to_dict(), {})
            ckpt.wait()

        with pytest.raises(DiskFull) as raised:
            save_and_wait()
        message = str(raised.value)
        assert f"no space left writing checkpoint 2 at {disk / 'checkpoints'}" in message
        assert f"newest complete checkpoint {disk / 'checkpoints'}/1" in message
        assert [p.name for p in (disk / "checkpoints").iterdir()] == ["1"]  # no partial step left
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_objective_off_on_both_sides_does_not_block_a_resume_with_its_settings_changed():
    """``objective.ae_*`` and ``objective.tie_*`` shape nothing while their objective is off, so a
    changed default there must not refuse a resume (or a finished study run); the switch itself,
    and the settings of an objective that is on, still do."""
    from gist_jax.train.integrity import changed_keys

    def run(**objective):
        return {"objective": {"ae": False, "ae_lambda": 0.1, "ae_layer": -1, "tie": True, "tie_gamma": 2.0,
                              **objective}, "step": {"seed": 0}}

    assert changed_keys(run(), run(ae_lambda=1.0, ae_layer=15)) == {}
    assert changed_keys(run(), run(ae=True)) == {"objective.ae": (False, True)}
    assert changed_keys(run(ae=True), run(ae=True, ae_layer=15)) == {"objective.ae_layer": (-1, 15)}
    assert changed_keys(run(), run(tie_gamma=1.0)) == {"objective.tie_gamma": (2.0, 1.0)}
    assert changed_keys(run(tie=False), run(tie=False, tie_gamma=1.0)) == {}
