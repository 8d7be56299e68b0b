"""Chunk sizing (issue #16): the liveness estimate of a sweep chunk vs XLA's memory analysis, and the OOM fallback."""

import jax
import numpy as np
import pytest

from jdq import sweep as S
from jdq.models import dit
from jdq.sweep import core as C


def _tiny(depth=1, steps=2):
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=3)
    return S.class_spec(dit.from_config(cfg, key=1), np.array([0, 2]), steps=steps, guidance=4.0)


def _xla_bytes(spec, group, chunk):
    """Temporaries + outputs of the compiled vmapped program at ``chunk`` points, plus the chunk's states."""
    states = jax.tree.map(lambda a: a[:chunk], group.states)
    m = C.vmapped_sampler(spec, group.plan).lower(*spec.inputs, states).compile().memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes + C.tree_bytes(states)


def test_liveness_counts_live_values_per_point_and_shared():
    import jax.numpy as jnp

    w, x = jnp.zeros((64, 64)), jnp.zeros((8, 64))  # 16 KiB shared, 2 KiB per point

    def f(w, x):
        h = jnp.tanh(x @ w)  # x @ w is freed once tanh has read it
        _ = jnp.exp(x @ w @ w)  # dead code: XLA drops it
        return h @ (w * 2)  # w * 2 depends on no point: made once

    assert S.jaxpr_bytes(f, (w, x), (False, True)) == S.MemoryEstimate(per_point=2 * 2048, shared=16384)

    def g(w, x):  # a scan: its body's peak on top of the carry in and out
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0]

    assert S.jaxpr_bytes(g, (w, x), (False, True)) == S.MemoryEstimate(per_point=4 * 2048, shared=0)
    # a per-point weight makes the carry per point after the first step (vmap's fixed point)
    assert S.jaxpr_bytes(g, (w, x), (True, False)) == S.MemoryEstimate(per_point=16384 + 3 * 2048, shared=0)

    def h(i, x):  # a per-point branch index: every branch runs (on shared inputs) and their outputs are kept
        return jax.lax.switch(i, [lambda x: x * 2, lambda x: x + 1, lambda x: jnp.sin(x) * 3], x)

    assert S.jaxpr_bytes(h, (0, x), (True, False)) == S.MemoryEstimate(per_point=4 + 2048, shared=2 * 2048 + 3 * 2048)


def test_scan_and_while_layouts_do_not_need_version_specific_parameter_names():
    """jax 0.11's scan parameters differ from 0.10's: the layout read from the shapes equals the named one."""
    import jax.numpy as jnp

    w, c0, xs = jnp.ones(3), jnp.ones(3), jnp.ones((4, 3))

    def f(c, xs):  # one const (w), two carries, one scanned input, two stacked outputs
        return jax.lax.scan(lambda c, x: ((c[0] + x * w, c[1] * 2), (c[0] * x, x.sum())), (c, c), xs)

    (eqn,) = [e for e in jax.make_jaxpr(f)(c0, xs).jaxpr.eqns if e.primitive.name == "scan"]
    body, nc, ncar = C._scan_layout(eqn)
    assert (nc, ncar) == (eqn.params["num_consts"], eqn.params["num_carry"]) == (1, 2)
    bare = eqn.replace(params={k: v for k, v in eqn.params.items() if k not in ("num_consts", "num_carry")})
    assert C._scan_layout(bare) == (body, 1, 2)
    for batched in ([True, False, False, False], [False, False, True, False], [False, False, False, True]):
        assert C._nested(bare, batched, [True] * 4) == C._nested(eqn, batched, [True] * 4)

    def g(c):  # a while loop with consts in both jaxprs
        return jax.lax.while_loop(lambda c: c[0] < w.sum() * 4, lambda c: c * w + 1, c)

    (weqn,) = [e for e in jax.make_jaxpr(g)(c0).jaxpr.eqns if e.primitive.name == "while"]
    assert S.jaxpr_bytes(g, (c0,), (True,)).per_point > 0
    renamed = weqn.replace(params={("c_j" if k == "cond_jaxpr" else "b_j" if k == "body_jaxpr" else k): v
                                   for k, v in weqn.params.items()})
    for batched in ([True], [False]):
        assert C._nested(renamed, batched, [True]) == C._nested(weqn, batched, [True])
    cn, bn = weqn.params["cond_nconsts"], weqn.params["body_nconsts"]
    assert (len(weqn.params["cond_jaxpr"].jaxpr.invars) - 1, len(weqn.params["body_jaxpr"].jaxpr.invars) - 1) == (cn, bn)


CONFIGS = {
    # the MixDiT recipe's ratio: stateful activations, stateless (shared) MX6 weights
    "mixdit ratio": (lambda: _tiny(depth=1, steps=1), ["ratio=0,0.1,0.2,0.3"], dict(recipe="mixdit")),
    # per-layer bit widths: the weights depend on the state, so each point quantizes its own
    "bit widths": (lambda: _tiny(depth=2, steps=2), ["bits.blocks.0.attn.qkv=2,8", "bits[blocks.1.mlp.*]=4,8"],
                   dict(num_steps=2)),
}


@pytest.mark.parametrize("name", [pytest.param("mixdit ratio", marks=pytest.mark.slow), "bit widths"])
def test_estimate_bounds_xla_and_is_tighter_than_the_old_bound(name):
    make, vary, kw = CONFIGS[name]
    spec = make()
    ops = S.spec_operands(spec)
    (group,) = S.build_groups(S.grid(S.parse_vary(vary)), ops, **kw)
    state0 = jax.tree.map(lambda a: a[0], group.states)
    est = S.sweep_bytes(spec, group.plan, state0)
    assert est.per_point > 0 and est.shared > 0
    old = C.point_bytes(ops, state0, int(np.prod(spec.shape)) * 4, 2, True) + C.hoisted_bytes(
        group.plan, state0, spec.sampler.num_steps)
    for chunk in (1, 4):
        xla = _xla_bytes(spec, group, chunk)
        # conservative (≥ XLA, so the runner's MEMORY_SAFETY of 1 holds) and within 4× of it
        assert xla <= est.total(chunk) * C.MEMORY_SAFETY <= 4 * xla, (chunk, est, xla)
    # the old bound (every operand of a model call alive at once, ×3) is far looser at 4 points
    assert old * 4 >= 2 * est.total(4), (old, est)


def test_chunk_size_takes_shared_bytes_off_the_budget():
    assert S.chunk_size(64, per_point=10, budget=100, shared=50) == 5
    assert S.chunk_size(64, per_point=10, budget=100, shared=500) == 1  # at least one point


_REAL = C.vmapped_sampler
_COMPILED = {}  # one jitted sampler per (spec, plan) for every test double: each chunk size compiles once


def _oom_above(monkeypatch, limit, calls, error="RESOURCE_EXHAUSTED: Out of memory while trying to allocate"):
    """Make the vmapped sampler raise XLA's out-of-memory error for calls of more than ``limit`` points."""
    def fake(spec, plan):
        run = _COMPILED.setdefault((id(spec), id(plan)), _REAL(spec, plan))

        def call(*args):
            n = jax.tree.leaves(args[-1])[0].shape[0]
            calls.append(n)
            if n > limit:
                raise RuntimeError(error)
            return run(*args)
        return call
    monkeypatch.setattr(C, "vmapped_sampler", fake)


def test_out_of_memory_halves_the_call_and_keeps_the_chunks(monkeypatch):
    spec = _tiny(depth=1, steps=1)
    (group,) = S.build_groups(S.grid({"ratio": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}), S.spec_operands(spec), recipe="mixdit")
    calls, events, written = [], [], []
    _oom_above(monkeypatch, 99, calls)
    want = S.run_group(spec, group, chunk=2)  # uninterrupted, 2 points per call
    assert calls == [2, 2, 2]
    calls.clear()
    _oom_above(monkeypatch, 2, calls)
    got = S.run_group(spec, group, chunk=4, on_chunk=lambda s, x: written.append((s, x.shape[0])),
                      on_oom=lambda start, size, new, e: events.append((start, size, new)))
    assert events == [(0, 4, 2)]  # halved once; later chunks keep the smaller call
    assert calls == [4, 2, 2, 2]
    assert written == [(0, 4), (4, 2)]  # on-disk chunks (and resumption) keep the asked chunk's starts
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)  # the same program (2 points) on the same inputs
    # a chunk that skips its first part resumes at the asked chunk's start
    calls.clear()
    part = S.run_group(spec, group, chunk=4, skip=lambda s: s == 0)
    assert part[:4] == [None] * 4 and calls == [4, 2]
    np.testing.assert_array_equal(part[5], want[5])


def test_out_of_memory_at_one_point_or_another_error_is_raised(monkeypatch):
    spec = _tiny(depth=1, steps=1)
    (group,) = S.build_groups(S.grid({"ratio": [0.0, 0.1, 0.2]}), S.spec_operands(spec), recipe="mixdit")
    calls, events = [], []
    _oom_above(monkeypatch, 0, calls)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        S.run_group(spec, group, chunk=3, on_oom=lambda *a: events.append(a[1:3]))
    assert events == [(3, 1)] and calls == [3, 1]
    calls.clear()
    _oom_above(monkeypatch, 0, calls, error="INVALID_ARGUMENT: something else")
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        S.run_group(spec, group, chunk=3)
    assert calls == [3]  # not retried


@pytest.mark.slow
def test_runner_records_the_fallback_and_resumes_after_it(monkeypatch, tmp_path):
    from jdq.sweep import runner

    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    model = dit.from_config(cfg, key=1)
    calls, lines = [], []
    _oom_above(monkeypatch, 1, calls)
    kw = dict(recipe="mixdit", vary={"ratio": [0.0, 0.25, 0.5]}, metrics=["psnr"], hardware=["h100"], samples=2,
              steps=1, max_chunk=2, log=lines.append)
    first = runner.run_sweep(tmp_path, model, **kw)
    (mem,) = first["memory"]
    assert mem["chunk"] == 2 and mem["points_per_call"] == 1
    assert mem["out_of_memory"] == [{"start": 0, "points_per_call": 2, "retried_with": 1}]
    assert mem["estimated_bytes_per_point"] > 0 and mem["estimated_shared_bytes"] > 0
    assert any("out of memory at 2 points per call" in s for s in lines)
    files = sorted(p.name for p in (tmp_path / "points").iterdir())
    assert files == ["g00-c0000.npz", "g00-c0002.npz"]  # the asked chunks, not the calls
    dropped = np.load(tmp_path / "points" / "g00-c0002.npz")["samples"]
    (tmp_path / "points" / "g00-c0002.npz").unlink()
    lines.clear()
    again = runner.run_sweep(tmp_path, model, **kw)
    assert any("1 chunk(s) to sample" in s for s in lines)
    np.testing.assert_array_equal(np.load(tmp_path / "points" / "g00-c0002.npz")["samples"], dropped)
    assert [r["metrics"] for r in again["points"]] == [r["metrics"] for r in first["points"]]
