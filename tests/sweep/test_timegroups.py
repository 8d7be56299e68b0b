"""Per-time-group precision: patterns as state in one compiled sampler, costs additive over groups."""

import numpy as np
import pytest

from jdq import sweep as S
from jdq.models import dit
from jdq.sweep import latency as L
from jdq.sweep import timegroups as T


@pytest.mark.slow
def test_time_group_patterns_vmapped_and_costed():
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    spec = S.class_spec(dit.from_config(cfg, key=1), np.array([0, 2]), steps=3, guidance=4.0)
    ops = S.spec_operands(spec)
    groups = T.thirds(3)
    np.testing.assert_array_equal(T.group_steps(groups, 3), [1, 1, 1])
    plan = T.time_group_plan(ops, ["mx9", "mx4"], groups)
    pats = [(0, 0, 0), (0, 1, 0), (1, 1, 1), (1, 0, 1)]
    group = S.Group(plan, "time-groups", list(range(4)), [{"pattern": p} for p in pats],
                    S.core.Q.stack_states([T.pattern_state(plan, p) for p in pats]))
    got, want = S.run_group(spec, group, chunk=4), S.run_loop(spec, group)
    for i, a in enumerate(got):  # each pattern's vmapped samples are nearest its own per-pattern run
        assert int(np.argmin([np.mean(np.abs(a - w)) for w in want])) == i
    # the all-mx9 and all-mx4 patterns differ (the state really switches formats)
    assert np.mean(np.abs(want[0] - want[2])) > 0
    costs = T.time_group_costs(L.preset("mixdit_like"), ops, ["mx9", "mx4"], groups, 3)
    assert costs.shape == (3, 2) and np.all(costs[:, 0] >= costs[:, 1])
    # the least-latency pattern with mx9 in the first and last group, by the ILP over groups
    scores = np.array([[0.0, -5.0], [0.0, -1.0], [0.0, -5.0]])  # the ends are sensitive, the middle is not
    best = L.allocate_latency(scores, costs, costs[:, 0].sum() - 0.5 * (costs[1, 0] - costs[1, 1]))
    assert best.choice == (0, 1, 0)
