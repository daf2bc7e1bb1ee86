"""Faults inside the training loop's own machinery, tested in-process: device copies of layouts
that must follow the layout's value, the state checksum that detects damaged checkpoints, the
config keys that may change on resume."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from gist_jax.gist.layout import cached_layout
from gist_jax.gist.specs import layout_arrays
from gist_jax.train.checkpoint import Checkpointer, DiskFull
from gist_jax.train.config import MeshConfig
from gist_jax.train.mesh import make_mesh


def _per_segment_run():
    from gist_jax.train.experiment import default_config, run_config

    cd = default_config()
    cd.model.init = "preset:tiny"
    cd.compression.update(memory="kv", granularity="fine", segment_length=16, ratios=(1, 2, 4, 8),
                          ratio_sampling="per_segment", num_sinks=2)
    cd.step.update(seq_len=8 * 16, batch_size=2)
    cd.mesh.update(data=1, fsdp=1, tensor=1)
    return run_config(cd)


def test_step_layouts_are_built_once_per_layout_and_follow_the_ratios():
    """Per-segment ratios: 4^8 layouts, far more than the cache keeps. Every lookup returns the
    device arrays and FLOPs of that step's own layout (an id-keyed cache once returned another
    layout's masks after eviction), an entry is built once per distinct layout while it is kept,
    and the cache stays bounded. The arrays are placed on the mesh, replicated."""
    import jax

    from gist_jax.model.config import preset
    from gist_jax.train.flops import train_flops_per_step
    from gist_jax.train.step_layouts import StepLayouts, step_layout_key

    run = _per_segment_run()
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=[_cpu0()])
    layouts = StepLayouts(run, preset("tiny"), mesh)
    seen = set()
    for step in range(1200):
        entry = layouts.for_step(step)
        key = step_layout_key(run, step)
        seen.add(key[0])
        assert entry.layout.ratios == key[0]
        want = layout_arrays(cached_layout(run.step.seq_len, run.compression, *key))
        for name in ("position", "memory_position", "memory_slot", "alive", "raw_position"):
            np.testing.assert_array_equal(jax.device_get(entry.arrays[name]), np.asarray(want[name]),
                                          err_msg=f"{name} {key}")
        assert entry.arrays["position"].sharding.is_fully_replicated
        if step % 300 == 0:
            assert entry.flops == train_flops_per_step(preset("tiny"), run.compression, run.step.seq_len,
                                                       run.step.batch_size, key[0])["total"]
    assert len(seen) > 1000
    assert len(layouts._entries) <= StepLayouts.MAX_ENTRIES
    fresh = StepLayouts(run, preset("tiny"), mesh)
    entries = [fresh.for_step(s) for s in (0, 1, 0, 2, 1, 0)]
    assert fresh.builds == 3 and entries[0] is entries[2] is entries[5] and entries[1] is entries[4]


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
