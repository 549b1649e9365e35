"""Unit tests for the CLaSp DP (vllm_clasp.core.optimizer) on synthetic layers; plain torch, fast."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vllm_clasp.core.optimizer import SkipSearch, plan_layer_calls, search_skip_sets


# ----------------------------------------------------------------------------- helpers
def run_path(h0: torch.Tensor, layers, skip: torch.Tensor) -> torch.Tensor:
    """h0 [K, d], skip [K, L] bool -> [K, d]: every row runs the layers it does not skip."""
    h = h0.clone()
    for i, f in enumerate(layers):
        h = torch.where(skip[:, i:i + 1], h, f(h))
    return h


def trajectory_of(h0: torch.Tensor, layers) -> torch.Tensor:
    """h0 [d] -> [L+1, 1, d]."""
    out = [h0]
    for f in layers:
        out.append(f(out[-1][None])[0])
    return torch.stack(out)[:, None]


def all_subsets(L: int, skippable: list[int], m: int) -> torch.Tensor:
    """[C, L] bool: every m-subset of skippable layers."""
    rows = []
    for c in itertools.combinations(skippable, m):
        r = torch.zeros(L, dtype=torch.bool)
        r[list(c)] = True
        rows.append(r)
    return torch.stack(rows)


def cos_to(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(states.double(), target.double()[None], dim=-1)


def rotation_layers(L: int, d: int, g: torch.Generator):
    """Layers acting on a 2-D plane: rotation by theta_l (sum < pi) times a positive scale."""
    basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))  # [d, 2]
    thetas = torch.rand(L, generator=g, dtype=torch.float64) + 0.05
    thetas = thetas / thetas.sum() * 3.0  # sum < pi
    scales = 0.5 + torch.rand(L, generator=g, dtype=torch.float64)
    layers = []
    for t, s in zip(thetas.tolist(), scales.tolist()):
        R = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
        A = s * basis @ R @ basis.T  # [d, d]; maps the plane to itself
        layers.append(lambda x, A=A: x @ A.T)
    h0 = basis @ torch.randn(2, generator=g, dtype=torch.float64)  # [d], in the plane
    return layers, h0


def mlp_layers(L: int, d: int, g: torch.Generator, dtype=torch.float64):
    layers = []
    for _ in range(L):
        W1 = torch.randn(4 * d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        W2 = torch.randn(d, 4 * d, generator=g, dtype=torch.float64) / math.sqrt(4 * d)
        W1, W2 = W1.to(dtype), W2.to(dtype)
        layers.append(lambda x, W1=W1, W2=W2: x + torch.tanh(x @ W1.T) @ W2.T)
    return layers


def as_run_layer(layers, log=None):
    def run_layer(i, states, rows):
        assert states.dim() == 2 and rows.shape == (states.shape[0],) and rows.dtype == torch.long
        if log is not None:
            log.append((i, states.shape[0]))
        return layers[i](states)
    return run_layer


def random_never_skip(L: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(L, generator=g) < 0.25


def check_mask(mask: torch.Tensor, m, never_skip: torch.Tensor):
    m = torch.as_tensor(m).expand(mask.shape[0])
    assert mask.dtype == torch.bool
    assert torch.equal(mask.sum(1), m)
    assert not (mask & never_skip[None]).any()


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("L", range(4, 11))
def test_exact_vs_brute_force_on_rotations(L, seed):
    g = torch.Generator().manual_seed(1000 * L + seed)
    layers, h0 = rotation_layers(L, 6, g)
    ns = random_never_skip(L, g)
    skippable = (~ns).nonzero()[:, 0].tolist()
    traj = trajectory_of(h0, layers)  # [L+1, 1, d]
    target = traj[L, 0]
    res = search_skip_sets(traj, as_run_layer(layers), max_skip=len(skippable), never_skip=ns, min_skip=0)
    for m in range(len(skippable) + 1):
        mask = res.skip_mask(m)
        check_mask(mask, m, ns)
        dp_cos = cos_to(run_path(h0[None], layers, mask), target)[0]
        subsets = all_subsets(L, skippable, m)
        best = cos_to(run_path(h0.expand(len(subsets), -1), layers, subsets), target).max()
        assert dp_cos == pytest.approx(best.item(), abs=1e-5), (m, mask)
        assert res.cosine(m)[0].item() == pytest.approx(dp_cos.item(), abs=1e-5)
        # The tightly pruned search (min_skip == max_skip == m) picks the same set.
        tight = search_skip_sets(traj, as_run_layer(layers), max_skip=m, never_skip=ns)
        assert torch.equal(tight.skip_mask(m), mask)


def test_nonlinear_layers_valid_and_better_than_random():
    g = torch.Generator().manual_seed(7)
    L, d, m = 10, 16, 5
    layers = mlp_layers(L, d, g)
    ns = torch.zeros(L, dtype=torch.bool)
    ns[[0, L - 1]] = True
    h0 = torch.randn(d, generator=g, dtype=torch.float64)
    traj = trajectory_of(h0, layers)
    res = search_skip_sets(traj, as_run_layer(layers), max_skip=m, never_skip=ns)
    mask = res.skip_mask(m)
    check_mask(mask, m, ns)
    target = traj[L, 0]
    dp = cos_to(run_path(h0[None], layers, mask), target)[0].item()
    subsets = all_subsets(L, list(range(1, L - 1)), m)
    all_cos = cos_to(run_path(h0.expand(len(subsets), -1), layers, subsets), target)
    rank = int((all_cos > dp + 1e-12).sum())
    print(f"\n[nonlinear L={L} M={m}] DP cos={dp:.5f} brute-force best={all_cos.max():.5f} "
          f"mean of all {len(subsets)} subsets={all_cos.mean():.5f}; DP rank {rank + 1}/{len(subsets)}")
    assert dp >= all_cos.mean().item()
    assert res.cosine(m)[0].item() == pytest.approx(dp, abs=1e-5)


# ----------------------------------------------------------------------------- batching
def per_request_problem(B: int, L: int, d: int, seed: int):
    """Layers whose output depends on the request: f_i(x) + bias[request]."""
    g = torch.Generator().manual_seed(seed)
    layers = mlp_layers(L, d, g)
    bias = 0.3 * torch.randn(B, L, d, generator=g, dtype=torch.float64)  # [B, L, d]
    h0 = torch.randn(B, d, generator=g, dtype=torch.float64)

    def layer_for(b, i):
        return lambda x: layers[i](x) + bias[b, i]

    trajs = [trajectory_of(h0[b], [layer_for(b, i) for i in range(L)]) for b in range(B)]
    traj = torch.cat(trajs, dim=1)  # [L+1, B, d]

    def run_layer(i, states, rows):
        return layers[i](states) + bias[rows, i]
    return traj, run_layer, layer_for


def test_batched_equals_separate_and_request_rows():
    B, L, d, J = 4, 9, 12, 5
    traj, run_layer, layer_for = per_request_problem(B, L, d, seed=3)
    ns = torch.tensor([True] + [False] * (L - 2) + [True])
    batched = search_skip_sets(traj, run_layer, max_skip=J, never_skip=ns, min_skip=2)
    for b in range(B):
        single_layers = [layer_for(b, i) for i in range(L)]
        single = search_skip_sets(traj[:, b:b + 1], as_run_layer(single_layers), max_skip=J,
                                  never_skip=ns, min_skip=2)
        for m in range(2, J + 1):
            assert torch.equal(batched.skip_mask(m)[b], single.skip_mask(m)[0])
        torch.testing.assert_close(batched.final_cosine[b], single.final_cosine[0], equal_nan=True)
        # Each request's chosen set, run with that request's own layers, gives the DP's cosine.
        for m in range(2, J + 1):
            mask = batched.skip_mask(m)[b:b + 1]
            c = cos_to(run_path(traj[0, b:b + 1], single_layers, mask), traj[L, b])[0]
            assert c.item() == pytest.approx(batched.cosine(m)[b].item(), abs=1e-5)
    # The requests really differ (otherwise request_rows would be untested).
    assert len({tuple(batched.skip_mask(J)[b].tolist()) for b in range(B)}) > 1


def useful_states(L, skippable, J, min_skip):
    """Set of (i, j), j >= 1, on some path (0,0) -> (L, m), min_skip <= m <= J (independent enumeration)."""
    fwd = [{0}]
    for i in range(L):
        fwd.append({j for j in fwd[-1]} | ({j + 1 for j in fwd[-1] if j + 1 <= J} if skippable[i] else set()))
    bwd = [set() for _ in range(L + 1)]
    bwd[L] = set(range(min_skip, J + 1))
    for i in range(L - 1, -1, -1):
        bwd[i] = set(bwd[i + 1]) | ({j - 1 for j in bwd[i + 1] if j >= 1} if skippable[i] else set())
    return {(i, j) for i in range(L + 1) for j in fwd[i] & bwd[i] if j >= 1}


@pytest.mark.parametrize("J,min_skip", [(0, 0), (1, 1), (4, 4), (4, 0), (6, 3), (7, 7)])
def test_one_call_per_layer_and_row_counts(J, min_skip):
    B, L, d = 3, 10, 8
    traj, run_layer, _ = per_request_problem(B, L, d, seed=5)
    ns = torch.zeros(L, dtype=torch.bool)
    ns[[0, 4, L - 1]] = True
    log = []

    def logged(i, states, rows):
        log.append((i, states.shape[0], rows.clone()))
        return run_layer(i, states, rows)

    search_skip_sets(traj, logged, max_skip=J, never_skip=ns, min_skip=min_skip)
    if J == 0:
        assert log == []
        return
    layers_called = [i for i, _, _ in log]
    assert layers_called == sorted(set(layers_called)) and len(log) <= L
    useful = useful_states(L, (~ns).tolist(), J, min_skip)
    for i, n, rows in log:
        exec_pairs = [j for j in range(1, J + 1) if (i, j) in useful and (i + 1, j) in useful]
        assert n == B * len(exec_pairs)
        assert torch.equal(rows, torch.arange(B).repeat_interleave(len(exec_pairs)))
    expected_layers = [i for i in range(L) if any((i, j) in useful and (i + 1, j) in useful
                                                  for j in range(1, J + 1))]
    assert layers_called == expected_layers
    plan = plan_layer_calls(L, J, ns, min_skip)  # the static schedule a host can size buffers from
    assert [(i, B * len(e)) for i, (e, _) in enumerate(plan) if e] == [(i, n) for i, n, _ in log]


def test_per_request_num_skip_from_one_table():
    B, L, d = 4, 8, 10
    traj, run_layer, _ = per_request_problem(B, L, d, seed=11)
    res = search_skip_sets(traj, run_layer, max_skip=6, min_skip=1)
    ms = torch.tensor([1, 6, 3, 4])
    mask = res.skip_mask(ms)
    check_mask(mask, ms, torch.zeros(L, dtype=torch.bool))
    for b, m in enumerate(ms.tolist()):
        assert torch.equal(mask[b], res.skip_mask(m)[b])
    assert res.cosine(ms).shape == (B,)


# ----------------------------------------------------------------------------- edge cases
def test_edge_cases():
    B, L, d = 2, 6, 8
    traj, run_layer, _ = per_request_problem(B, L, d, seed=13)
    calls = []

    def counting(i, s, r):
        calls.append(i)
        return run_layer(i, s, r)

    # M = 0: empty skip set, no layer calls, cosine 1.
    res = search_skip_sets(traj, counting, max_skip=0)
    assert calls == [] and not res.skip_mask(0).any()
    torch.testing.assert_close(res.cosine(0), torch.ones(B))
    # M = all skippable layers.
    ns = torch.tensor([True, False, False, True, False, True])
    res = search_skip_sets(traj, run_layer, max_skip=3, never_skip=ns)
    assert torch.equal(res.skip_mask(3), (~ns)[None].expand(B, -1))
    # Indices form of never_skip (negative allowed) equals the mask form.
    res2 = search_skip_sets(traj, run_layer, max_skip=3, never_skip=[0, 3, -1])
    assert torch.equal(res2.skip_mask(3), res.skip_mask(3))
    # never_skip everything: only M = 0.
    all_ns = torch.ones(L, dtype=torch.bool)
    assert not search_skip_sets(traj, run_layer, max_skip=0, never_skip=all_ns).skip_mask(0).any()
    with pytest.raises(ValueError, match="skippable"):
        search_skip_sets(traj, run_layer, max_skip=1, never_skip=all_ns)
    with pytest.raises(ValueError, match="min_skip"):
        search_skip_sets(traj, run_layer, max_skip=2, min_skip=3)
    # Unreachable M: pruned below min_skip, above max_skip, negative, wrong shape.
    res = search_skip_sets(traj, run_layer, max_skip=4, min_skip=2)
    assert res.reachable_counts() == [0, 2, 3, 4]
    for bad in (1, 5, -1, torch.tensor([2, 1])):
        with pytest.raises(ValueError, match="not reachable"):
            res.skip_mask(bad)
    with pytest.raises(ValueError, match="shape"):
        res.skip_mask(torch.tensor([2, 2, 2]))
    assert torch.isnan(res.final_cosine[:, 1]).all() and not torch.isnan(res.final_cosine[:, 2:]).any()
    # B = 1 and a single-layer model.
    res = search_skip_sets(traj[:2, :1], lambda i, s, r: run_layer(i, s, r), max_skip=1)
    assert torch.equal(res.skip_mask(1), torch.tensor([[True]]))


def test_bfloat16_states():
    g = torch.Generator().manual_seed(17)
    L, d, J = 8, 16, 4
    layers = mlp_layers(L, d, g, dtype=torch.bfloat16)
    h0 = torch.randn(2, d, generator=g).to(torch.bfloat16)
    seen = []

    def run_layer(i, s, r):
        seen.append(s.dtype)
        return layers[i](s)

    traj = [h0]
    for f in layers:
        traj.append(f(traj[-1]))
    traj = torch.stack(traj)  # [L+1, 2, d] bf16
    res = search_skip_sets(traj, run_layer, max_skip=J, never_skip=[0])
    assert set(seen) == {torch.bfloat16}
    assert res.final_cosine.dtype == torch.float32
    assert isinstance(res, SkipSearch)
    check_mask(res.skip_mask(J), J, torch.tensor([True] + [False] * (L - 1)))
    assert (res.cosine(J) > 0).all()


def test_online_trajectory_equals_given_trajectory_with_one_call_per_layer():
    """Passing only h_0 makes the DP compute h_1..h_L in the candidates' own layer calls."""
    B, L, d, J = 3, 9, 12, 4
    traj, run_layer, _ = per_request_problem(B, L, d, seed=5)
    calls = []

    def counting(i, states, rows):
        calls.append((i, len(rows)))
        return run_layer(i, states, rows)

    given = search_skip_sets(traj, run_layer, max_skip=J, never_skip=[0, -1], min_skip=1)
    online = search_skip_sets(traj[:1], counting, max_skip=J, never_skip=[0, -1], min_skip=1,
                              num_layers=L)
    assert [i for i, _ in calls] == list(range(L))
    for m in range(1, J + 1):
        assert torch.equal(given.skip_mask(m), online.skip_mask(m))
    torch.testing.assert_close(given.final_cosine, online.final_cosine, equal_nan=True)
    plan = plan_layer_calls(L, J, [0, -1], 1)
    assert [n for _, n in calls] == [B + B * len(e) for e, _ in plan]
    with pytest.raises(ValueError, match="num_layers"):
        search_skip_sets(traj[:1], run_layer, max_skip=J)


# ----------------------------------------------------------------------------- shared sets
def test_groups_of_one_equal_the_per_request_search():
    B, L, d, J = 4, 9, 12, 5
    traj, run_layer, _ = per_request_problem(B, L, d, seed=7)
    alone = search_skip_sets(traj, run_layer, max_skip=J, min_skip=2)
    grouped = search_skip_sets(traj, run_layer, max_skip=J, min_skip=2,
                               groups=torch.arange(B))
    for m in range(2, J + 1):
        assert torch.equal(alone.skip_mask(m), grouped.skip_mask(m))
    torch.testing.assert_close(alone.final_cosine, grouped.final_cosine, equal_nan=True)


def test_a_group_of_copies_of_one_request_gets_that_requests_set():
    B, L, d, J = 1, 8, 10, 4
    traj, run_layer, _ = per_request_problem(B, L, d, seed=11)
    single = search_skip_sets(traj, run_layer, max_skip=J, min_skip=1)
    copies = traj.expand(-1, 3, -1)  # [L+1, 3, d]: the same request three times

    def run_copies(i, states, rows):
        return run_layer(i, states, torch.zeros_like(rows))
    grouped = search_skip_sets(copies, run_copies, max_skip=J, min_skip=1,
                               groups=torch.zeros(3, dtype=torch.long))
    for m in range(1, J + 1):
        assert torch.equal(grouped.skip_mask(m), single.skip_mask(m).expand(3, -1))


def test_a_groups_set_is_as_close_to_the_brute_force_best_as_per_request_sets_are():
    """Per-request layers (nonlinear, so the DP is a heuristic: exact only for layers like
    rotations), three requests in one group and a fourth alone, 8 problems x M = 1..4.
    The group's set is one set; each request's reported cosine is what running it through
    that set gives; and its summed fit, as a share of the brute-force best summed fit over
    every set of that size, is on average no worse than the per-request DP's own share of
    each request's brute-force best (measured: 0.95 against 0.85)."""
    B, L, d, J = 4, 8, 10, 4
    ns = torch.tensor([True] + [False] * (L - 2) + [True])
    skippable = (~ns).nonzero()[:, 0].tolist()
    group_shares, own_shares = [], []
    for seed in range(8):
        traj, run_layer, layer_for = per_request_problem(B, L, d, seed=100 + seed)
        res = search_skip_sets(traj, run_layer, max_skip=J, never_skip=ns, min_skip=1,
                               groups=torch.tensor([0, 0, 0, 1]))
        alone = search_skip_sets(traj, run_layer, max_skip=J, never_skip=ns, min_skip=1)
        for m in range(1, J + 1):
            mask = res.skip_mask(m)  # [B, L]
            check_mask(mask, m, ns)
            assert torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2])
            subsets = all_subsets(L, skippable, m)  # [C, L]
            summed = torch.zeros(len(subsets), dtype=torch.float64)
            for b in range(3):
                layers_b = [layer_for(b, i) for i in range(L)]
                fit = cos_to(run_path(traj[0, b].expand(len(subsets), -1), layers_b, subsets),
                             traj[L, b])  # [C]
                summed += fit
                own = cos_to(run_path(traj[0, b:b + 1], layers_b, mask[b:b + 1]), traj[L, b])
                assert res.cosine(m)[b].item() == pytest.approx(own.item(), abs=1e-5)
                own_shares.append(alone.cosine(m)[b].item() / fit.max().item())
            group_shares.append(res.cosine(m)[:3].double().sum().item() / summed.max().item())
    mean = sum(group_shares) / len(group_shares)
    assert mean >= sum(own_shares) / len(own_shares) and mean >= 0.9, mean


def test_groups_are_checked():
    traj, run_layer, _ = per_request_problem(2, 5, 6, seed=1)
    with pytest.raises(ValueError, match="groups must have shape"):
        search_skip_sets(traj, run_layer, max_skip=2, groups=torch.zeros(3, dtype=torch.long))


def test_run_layer_receives_request_rows_on_the_host():
    traj, run_layer, _ = per_request_problem(3, 6, 8, seed=2)
    devices = set()

    def spy(i, states, rows):
        devices.add(rows.device.type)
        return run_layer(i, states, rows)
    search_skip_sets(traj[:1], spy, max_skip=3, num_layers=6)
    assert devices == {"cpu"}
