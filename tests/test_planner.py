"""The budget planner: expected acceptance of the best tree, the choice of plan on injected machines, fallback."""

import itertools

import numpy as np
import pytest
from falconspec import SpeculativeGenerator
from falconspec.drafters import make_drafter
from falconspec.drafters.base import Drafter
from falconspec.planner import (MAX_DEPTH, MAX_RANK, AcceptanceProfile, BudgetPlanner, best_tree_gains, interpolate,
                                tree_trials)
from falconspec.tree import Tree

from drafters_for_tests import capture_sequences


def brute_force_best(p: np.ndarray, n: int, max_depth: int, max_rank: int = 3) -> float:
    """Max over every parent- and sibling-closed tree of n nodes of the sum of path probabilities."""
    paths = [path for d in range(1, max_depth + 1) for path in itertools.product(range(max_rank), repeat=d)]

    def value(path):
        return float(np.prod([p[d, r] for d, r in enumerate(path)]))

    best = 0.0
    for chosen in itertools.combinations(paths, n - 1):
        chosen_set = set(chosen)
        closed = all((len(q) == 1 or q[:-1] in chosen_set) and (q[-1] == 0 or q[:-1] + (q[-1] - 1,) in chosen_set)
                     for q in chosen)
        if closed:
            best = max(best, sum(value(q) for q in chosen))
    return best


@pytest.mark.parametrize("max_depth,max_nodes", [(1, 5), (2, 5), (3, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_best_tree_gains_match_brute_force(max_depth, max_nodes, seed):
    rng = np.random.default_rng(seed)
    p = np.sort(rng.uniform(0.05, 0.9, size=(MAX_DEPTH, MAX_RANK)), axis=1)[:, ::-1]  # non-increasing in rank
    gains = best_tree_gains(p, max_nodes, max_depth)
    for n in range(2, max_nodes + 1):
        assert gains[n] == pytest.approx(brute_force_best(p, n, max_depth, max_rank=n - 1))


def test_tree_trials_count_children_of_accepted_nodes():
    # root -> a (rank 0), b (rank 1); a -> c (rank 0); accepted path root, b
    tree = Tree((0, 1, 2, 3), (-1, 0, 0, 1))
    hits, trials = tree_trials(tree, [0, 2])
    assert trials[0, 0] == 1 and trials[0, 1] == 1 and hits[0, 1] == 1 and hits[0, 0] == 0
    assert trials[1].sum() == 0  # c's parent a was rejected: not a trial


def test_open_prior_cells_borrow_from_the_estimates_above_and_before():
    profile = AcceptanceProfile(np.array([[0.8, 0.1], [np.nan, np.nan]]), strength=16.0)
    p = profile.probabilities()
    assert p[0, 0] == pytest.approx(0.8) and p[1, 0] == pytest.approx(0.8)  # depth 2 follows depth 1
    assert p[0, 2] == pytest.approx(0.05)  # an open rank: half of what ranks 0 and 1 leave, at most half of rank 1
    assert p[1, 1] == pytest.approx(0.1)
    chain = Tree.chain(0, [1, 2])
    for _ in range(48):  # depth 1 is never right: the untried depth 2 is expected to fail too
        profile.observe(chain, [0])
    p = profile.probabilities()
    assert p[0, 0] == pytest.approx(0.8 * 16 / 64) and p[1, 0] == pytest.approx(p[0, 0])
    assert AcceptanceProfile().probabilities()[0, 0] == 0.5  # no calibration at all


def chain_profile(p_first: float, p_rest: float = 0.0, strength: float = 1e6) -> AcceptanceProfile:
    prior = np.full((MAX_DEPTH, MAX_RANK), p_rest)
    prior[:, 0] = p_first
    return AcceptanceProfile(prior, strength=strength)


SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def planner_for(costs_ms: dict, draft_ms_per_level: float, profile: AcceptanceProfile,
                max_depth: int = 8) -> BudgetPlanner:
    sizes = sorted(costs_ms)
    verify = interpolate(sizes, [costs_ms[n] / 1e3 for n in sizes])
    return BudgetPlanner(verify, lambda d: draft_ms_per_level * d / 1e3, profile, SIZES, max_depth)


def test_free_rows_verify_the_biggest_tree():
    planner = planner_for({n: 10.0 for n in SIZES}, 0.0, chain_profile(0.7, 0.2))
    plan = planner.start()
    assert plan.num_nodes == 32 and not plan.plain


def test_rows_that_cost_twice_a_step_fall_back_to_plain_decoding():
    costs = {1: 10.0, **{n: 20.0 for n in SIZES if n > 1}}
    # per depth at most 0.3 + 7 * 0.02 = 0.44 matches, so E[accepted] <= 0.44 / (1 - 0.44) < 1: 2x never pays
    planner = planner_for(costs, 0.5, chain_profile(0.3, 0.02))
    assert planner.start().plain and planner.fell_back
    assert planner.history[0].plan.plain


def test_the_issue_machine_picks_the_closed_form_optimum():
    # the Xeon of issue 11, stock F.linear in float32 (ms), and a perfect-chain drafter accepted 90% per level
    costs = {1: 30.5, 2: 33.5, 4: 47.8, 8: 55.6, 16: 62.4, 32: 74.2}
    per_level = 2.0
    planner = planner_for(costs, per_level, chain_profile(0.9), max_depth=8)
    verify = interpolate(sorted(costs), [costs[n] for n in sorted(costs)])
    best = max(((1 + sum(0.9 ** d for d in range(1, depth + 1))) / (verify(n) + per_level * depth), n, depth)
               for n in SIZES if n >= 2 for depth in range(1, min(n - 1, 8) + 1))
    plan = planner.start()
    assert (plan.num_nodes, plan.depth) == (best[1], best[2])
    assert plan.tokens_per_second * 1e-3 == pytest.approx(best[0])
    assert not plan.plain


def test_the_plan_follows_the_acceptances_of_the_generation():
    costs = {1: 10.0, 2: 11.0, 4: 12.0, 8: 14.0, 16: 18.0, 32: 26.0}
    planner = planner_for(costs, 0.5, AcceptanceProfile(np.array([[0.9, 0.3]] * 8), strength=4.0))
    first = planner.start()
    assert not first.plain and first.num_nodes >= 4
    chain = Tree.chain(0, [1, 2, 3])
    for _ in range(40):  # the drafter is never right
        plan = planner.observe(chain, [0])
    assert plan.plain and planner.fell_back
    assert [c.plan.plain for c in planner.history][-1] and len(planner.history) >= 2


def test_a_batch_share_of_the_cost_replans_keeping_what_was_learnt():
    # alone, up to 32 rows cost one step: the biggest tree; in a batch of 8, a sequence's 8 rows are 64 of the forward
    costs = {**{n: 10.0 for n in SIZES}, 64: 80.0, 256: 640.0}
    planner = planner_for(costs, 0.1, chain_profile(0.6, 0.1))
    alone = planner.start()
    assert alone.num_nodes == 32
    planner.observe(Tree.chain(0, [1, 2]), [0, 1])
    verify = interpolate(sorted(costs), [costs[n] / 1e3 for n in sorted(costs)])
    shared = planner.set_verify_cost(lambda n: verify(8 * n) / 8)
    assert 1 < shared.num_nodes <= 4 and planner.current == shared and planner.history[-1].plan == shared
    assert planner._cycle == 1 and planner.profile.trials.sum() > 0  # the generation and its evidence go on
    with pytest.raises(ValueError, match="positive"):
        planner.set_verify_cost(lambda n: 0.0)


def test_costs_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        BudgetPlanner(lambda n: 0.0, lambda d: 0.0, AcceptanceProfile(), SIZES, 4)


def test_generator_decodes_plainly_when_the_planner_says_so(llama):
    costs = {1: 10.0, **{n: 40.0 for n in SIZES if n > 1}}
    planner = planner_for(costs, 1.0, chain_profile(0.5, 0.1))
    drafter = make_drafter("pld", llama)
    assert drafter.planned
    request = dict(prompt="one two one two one two one", max_new_tokens=24, ignore_eos=True)
    plain = SpeculativeGenerator(llama).generate(**request)
    out = SpeculativeGenerator(llama, drafter, planner=planner).generate(**request)
    assert out.token_ids == plain.token_ids
    assert out.stats.drafted_tokens == 0 and out.stats.fell_back
    assert out.stats.plans[0]["num_nodes"] == 1


def test_generator_follows_an_injected_plan_and_stays_exact(llama):
    costs = {n: 10.0 for n in SIZES}  # rows are free: the biggest tree
    planner = planner_for(costs, 0.0, chain_profile(0.9, 0.5))
    drafter = make_drafter("pld", llama, min_ngram=1)
    request = dict(prompt="abc abc abc abc abc", max_new_tokens=32, ignore_eos=True)
    plain = SpeculativeGenerator(llama).generate(**request)
    generator = SpeculativeGenerator(llama, drafter, planner=planner)
    sequences = capture_sequences(drafter)
    seen = []
    generator.listeners.append(lambda tree, path: seen.append(tree.num_nodes))
    out = generator.generate(**request)
    assert out.token_ids == plain.token_ids
    assert out.stats.plans[0]["num_nodes"] == 32 and not out.stats.fell_back
    # it got the plan's budget (or, on an exploring cycle, the same nodes one level deeper)
    assert sequences[-1].num_nodes == 32 and sequences[-1].depth - planner.current.depth in (0, 1)
    assert max(seen) <= 32
    assert len(out.token_depths) == len(out.token_ids)
    assert sum(d > 0 for d in out.token_depths) == out.stats.accepted_tokens


def test_explicit_budget_is_not_planned(llama):
    drafter = make_drafter("pld", llama, num_nodes=3)
    generator = SpeculativeGenerator(llama, drafter)
    assert not drafter.planned and generator.planner is None
    out = generator.generate(prompt="abab abab abab", max_new_tokens=16, ignore_eos=True)
    assert out.stats.plans == [] and out.stats.plan_summary == "fixed"


class FollowedTruth(Drafter):
    """Proposes the plain greedy continuation as a chain, within the planner's budget; cheap to follow."""

    name = "truth"
    planned = cheap_to_follow = True
    max_planned_depth = 6

    def __init__(self, full_ids):
        self.full_ids, self.proposed = list(full_ids), 0

    def begin(self, input_ids, hidden_states):
        pass

    def propose(self, input_ids, max_depth):
        self.proposed += 1
        n = input_ids.shape[0]
        return Tree.chain(int(input_ids[-1]), self.full_ids[n:n + min(self.depth, self.num_nodes - 1)])

    def observe(self, acceptance, hidden_states):
        pass


def test_a_cheap_drafter_is_probed_while_plain_and_switched_back_on(llama):
    prompt = [5, 9, 13, 17]
    plain = SpeculativeGenerator(llama).generate(input_ids=prompt, max_new_tokens=60, ignore_eos=True)
    costs = {1: 10.0, 2: 11.0, 4: 12.0, 8: 14.0, 16: 18.0, 32: 26.0}
    planner = planner_for(costs, 0.1, chain_profile(0.02, 0.01, strength=8), max_depth=6)  # prior: never right
    planner.probe = True
    drafter = FollowedTruth(prompt + plain.token_ids)
    out = SpeculativeGenerator(llama, drafter, planner=planner).generate(input_ids=prompt, max_new_tokens=60,
                                                                         ignore_eos=True)
    assert out.token_ids == plain.token_ids
    plans = [p["num_nodes"] for p in out.stats.plans]
    assert plans[0] == 1 and plans[-1] > 1, plans  # plain at first; the probes showed the drafter is right
    assert out.stats.accepted_tokens > 20 and out.stats.fell_back


def test_an_expensive_drafter_is_not_probed(llama):
    prompt = [5, 9, 13, 17]
    plain = SpeculativeGenerator(llama).generate(input_ids=prompt, max_new_tokens=30, ignore_eos=True)
    planner = planner_for({1: 10.0, 2: 11.0, 32: 26.0}, 0.1, chain_profile(0.02, 0.01), max_depth=6)
    drafter = FollowedTruth(prompt + plain.token_ids)
    drafter.cheap_to_follow = False
    sequences = capture_sequences(drafter)
    out = SpeculativeGenerator(llama, drafter, planner=planner).generate(input_ids=prompt, max_new_tokens=30,
                                                                         ignore_eos=True)
    assert out.token_ids == plain.token_ids and sequences[-1].proposed == 0 and out.stats.drafted_tokens == 0


def test_the_level_below_the_plan_is_explored_now_and_then_until_it_is_known():
    from falconspec.planner import CARRY_TRIALS, EXPLORE_EVERY

    costs = {n: 10.0 for n in SIZES}
    prior = np.full((MAX_DEPTH, MAX_RANK), 0.01)
    prior[0] = [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01]  # depth 2 looks hopeless: plan one level of siblings
    planner = planner_for(costs, 1.0, AcceptanceProfile(prior, strength=16.0), max_depth=4)
    plan = planner.start()
    assert plan.depth == 1 and plan.num_nodes > 2
    siblings = Tree((0, 1, 2), (-1, 0, 0))
    depths = []
    for _ in range(3 * EXPLORE_EVERY):
        depths.append(planner.cycle_budget(plan).depth)
        plan = planner.observe(siblings, [0])  # depth 1 never right: no trial reaches depth 2
    assert depths == ([1] * (EXPLORE_EVERY - 1) + [2]) * 3  # the same nodes, one level deeper, every 8th cycle
    planner.profile.carried_trials[1, 0] = CARRY_TRIALS  # the level below is known: no more exploring
    assert all(planner.cycle_budget(planner.observe(siblings, [0])).depth == 1 for _ in range(2 * EXPLORE_EVERY))


def test_exploring_finds_a_deeper_plan_the_prior_ruled_out(llama):
    """A drafter always right, whose prior says depth 2 never is: without exploring, the plan would stay one level
    deep for good; the explored cycles show depth 2 is right and the plan grows."""
    prompt = [5, 9, 13, 17]
    plain = SpeculativeGenerator(llama).generate(input_ids=prompt, max_new_tokens=60, ignore_eos=True)
    prior = np.full((MAX_DEPTH, MAX_RANK), 0.01)
    prior[0, 0] = 0.9
    planner = planner_for({n: 10.0 for n in SIZES}, 0.5, AcceptanceProfile(prior, strength=16.0), max_depth=6)
    drafter = FollowedTruth(prompt + plain.token_ids)
    drafter.cheap_to_follow = False
    out = SpeculativeGenerator(llama, drafter, planner=planner).generate(input_ids=prompt, max_new_tokens=60,
                                                                         ignore_eos=True)
    assert out.token_ids == plain.token_ids
    depths = [p["depth"] for p in out.stats.plans]
    assert depths[0] == 1 and max(depths) >= 2, out.stats.plans


def test_evidence_is_carried_to_the_next_generation_capped_and_replaces_the_prior():
    profile = AcceptanceProfile(np.array([[0.8, 0.2]]), strength=16.0)
    chain = Tree.chain(0, [1, 2])
    for _ in range(100):  # never right
        profile.observe(chain, [0])
    during = profile.probabilities()[0, 0]
    assert during == pytest.approx(0.8 * 16 / (16 + 100))  # within a generation the prior still counts
    profile.reset()  # a new generation starts from at most CARRY_TRIALS of the old evidence
    assert profile.trials.sum() == 0 and profile.carried_trials[0, 0] == pytest.approx(32.0)
    assert profile.probabilities()[0, 0] == 0.0  # a full cell of the workload's evidence: the prior is gone
    profile.observe(chain, [0, 1])
    assert profile.probabilities()[0, 0] == pytest.approx(1 / 33)

    partly = AcceptanceProfile(np.array([[0.8, 0.2]]), strength=16.0)
    for _ in range(8):
        partly.observe(chain, [0])
    partly.reset()  # 8 of 32 carried trials: the prior keeps three quarters of its weight
    assert partly.probabilities()[0, 0] == pytest.approx(0.8 * 12 / (12 + 8))


def test_a_calibration_that_overrates_later_candidates_is_corrected_by_the_workload():
    """The MT-bench case: a short calibration ranked a k=2 drafter's second candidate with its first, so wide trees
    looked as good as deep ones; the workload's evidence must end that, not stay diluted by the prior for good."""
    costs = {1: 10.0, 2: 10.5, 3: 11.0, 4: 11.5, 6: 12.5, 8: 13.5}
    planner = planner_for(costs, 0.5, AcceptanceProfile(np.array([[0.3, 0.3, 0.3], [0.3, 0.3, 0.3]]), strength=16.0),
                          max_depth=2)
    wide = Tree((0, 1, 2, 3), (-1, 0, 0, 0))  # three candidates at depth 1
    assert planner.start().num_nodes > 2
    for _ in range(3):  # generations in which only the first candidate is ever right, a third of the time
        planner.start()
        for cycle in range(60):
            planner.observe(wide, [0, 1] if cycle % 3 == 0 else [0])
    p = planner.profile.probabilities()
    assert p[0, 1] < 0.02 and p[0, 0] == pytest.approx(1 / 3, abs=0.02)


def test_a_fallback_that_would_be_final_waits_for_evidence():
    costs = {1: 10.0, 2: 11.0, 4: 12.0, 8: 14.0}
    planner = planner_for(costs, 0.5, chain_profile(0.6, 0.1, strength=2.0), max_depth=3)
    assert not planner.start().plain
    chain = Tree.chain(0, [1, 2, 3])
    plans = [planner.observe(chain, [0]) for _ in range(12)]
    assert not any(p.plain for p in plans[:7])  # fewer than MIN_FALLBACK_TRIALS trials: keep drafting
    assert plans[-1].plain


def test_a_plain_start_is_retried_from_the_prior_with_backoff():
    """One unlucky generation must not leave the planner plain for good: a plain start gathers no evidence."""
    costs = {1: 63.5, 2: 74.1, 3: 78.6, 4: 102.9, 8: 124.1, 16: 146.3, 32: 178.8}  # the Xeon of issue 12 (ms)
    prior = np.full((2, 1), 0.45)  # calibration: the drafter pays a little
    planner = planner_for(costs, 8.0, AcceptanceProfile(prior, strength=16.0), max_depth=2)
    chain = Tree.chain(0, [1, 2])

    def generation(right: bool) -> int:  # cycles drafted before the plan falls back (at most 64)
        plan, cycles = planner.start(), 0
        while not plan.plain and cycles < 64:
            plan, cycles = planner.observe(chain, [0, 1, 2] if right else [0]), cycles + 1
        return cycles

    drafted = [generation(right=False) > 0 for _ in range(20)]  # never right: retries at a doubling interval
    assert [g for g, d in enumerate(drafted) if d] == [0, 2, 5, 10, 19]
    while generation(right=True) == 0:  # the text changes and the drafter is right: the next retry finds it
        pass
    assert generation(right=True) == 64 and generation(right=False) > 0  # and it keeps drafting, wait reset
    never = planner_for(costs, 8.0, AcceptanceProfile(np.full((2, 1), 0.05), strength=16.0), max_depth=2)
    assert all(never.start().plain for _ in range(10))  # a drafter the calibration rules out is never retried


def test_a_batch_plans_one_budget_for_all_its_sequences():
    """The forward pads every tree to the largest: one sequence's tree costs every sequence its rows."""
    from falconspec.planner import batch_plan

    def share(batch):  # per sequence: c(B * n) / B, each row beyond the first costing a tenth of a step
        return lambda n: (1.0 + 0.1 * (batch * n - 1)) / batch

    sure, hopeless = np.full((6, 4), 0.01), np.full((6, 4), 0.01)
    sure[:, 0], hopeless[:, 0] = 0.95, 0.02  # the top candidate at every depth
    good = BudgetPlanner(share(4), lambda d: 0.0, AcceptanceProfile(sure), SIZES, max_depth=4)
    bad = BudgetPlanner(share(4), lambda d: 0.0, AcceptanceProfile(hopeless), SIZES, max_depth=4)
    alone = good.best_plan()
    assert alone.num_nodes >= 3
    together = batch_plan([good, good, good, good], [True] * 4)
    assert (together.num_nodes, together.depth) == (alone.num_nodes, alone.depth)  # the same sequences agree
    # three sequences whose drafters stopped following pay for the fourth's padded rows and gain nothing from them
    assert batch_plan([good, bad, bad, bad], [True, False, False, False]).num_nodes < alone.num_nodes
    assert batch_plan([bad] * 4, [True] * 4).plain
    assert batch_plan([good, good], [False, False]).plain
