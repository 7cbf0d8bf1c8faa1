"""The whole ladder, case by case: one table row per situation, each naming the case id
the decision must carry. A case id no row reaches fails the suite (see the last test)."""

from __future__ import annotations

import random

import pytest

from tron.common.config import Policy
from tron.common.ladder import (AlertAnswered, Approval, CallAsked, ChildFailed, Escalate, Escalated, Fail, Ignore,
                                LadderView, ParkCheck, Park, SpendView,
                                ProviderFailed, ProviderRules, ProviderStatus, Restart, Resume, RetryInPlace,
                                RestartAsked, ServiceView, Standing, SwitchProvider, TaskView, case_ids, compute_backoff,
                                decide, fold_advice, next_provider, parse_advice, still_stands, within,
                                worst_case_attempts)
from tron.common.states import ServiceState, TaskState

P = Policy(max_restarts=3, restart_window=60, backoff_initial=0.5, backoff_factor=2, backoff_max=10,
           backoff_jitter=0, max_provider_switches=2, min_uptime=1.0)
NOW = 1000.0


def view(*, decider="director-code", top=False, failures=(NOW,), streak=1, previous=None, looping=False,
         task=None, alert_status="pending", recorded=(), incarnation="i-1", stopped=False, replacing=False,
         provider="anthropic", state=ServiceState.FAILED) -> LadderView:
    return LadderView(
        now=NOW, policy=P, decider=decider, top=top,
        service=ServiceView(name="programmer-1", incarnation=incarnation, state=state, stopped=stopped,
                            replacing=replacing, provider=provider, failures=list(failures),
                            previous_failure=previous, unstable_streak=streak, crash_looping=looping),
        task=task, alert_status=alert_status, recorded=list(recorded), subtree=["programmer-1"])


def task(status=TaskState.RUNNING, restarts=0, switches=0) -> TaskView:
    return TaskView(task_id="t-1", status=status, restarts=restarts, switches=switches)


def failed(*, retryable=True, task_id="t-1", incarnation="i-1", reason="process_exit") -> ChildFailed:
    return ChildFailed("a-1", "programmer-1", incarnation, reason, retryable, task_id)


def escalated(kind="task", task_id="t-1") -> Escalated:
    return Escalated("a-1", "programmer-1", "max_restarts_exceeded", kind, task_id)


RESTART_BACK = Restart("restart_without_task", delay=0.0)

CLOSED = ProviderStatus()
OUTAGE = ProviderStatus(state="open", kind="outage", reason="3 failures in a row: overloaded_error", until_s=5.0)
HOLD = ProviderStatus(state="open", kind="hold", reason="rate_limit_error (retry-after 2s)", until_s=2.0)
LONG_HOLD = ProviderStatus(state="open", kind="hold", reason="usage_limit (retry-after 3600s)", until_s=3600.0)
PROBING = ProviderStatus(state="half_open", kind="outage", reason="probing")
FAILING = ProviderStatus(failures=2, last_error="api_error")  # closed, its last verdict a failure
BOTH_DOWN = ("all_providers_down: anthropic open (3 failures in a row: overloaded_error), "
             "ollama open (3 failures in a row: overloaded_error)")


def pview(anthropic=CLOSED, ollama=CLOSED, *, on_all_down="park", **kw) -> LadderView:
    """A provider failure seen by the daemon: every provider's state in the view."""
    v = view(decider="daemon", top=True, state=ServiceState.RUNNING, **kw)
    return v.model_copy(update={"providers": {"anthropic": anthropic, "ollama": ollama},
                                "rules": ProviderRules(on_all_down=on_all_down)})


def hview(*, providers: dict[str, ProviderStatus], chain=("anthropic", "ollama"), on_all_down="park",
          **kw) -> LadderView:
    """A process failure's view with the provider board in it (Carrier.view carries it)."""
    return view(**kw).model_copy(update={"chain": list(chain), "providers": providers,
                                         "rules": ProviderRules(on_all_down=on_all_down)})


def pfailed(*, provider="anthropic", reason="overloaded_error", retryable=True, retry_after=None,
            incarnation="i-1") -> ProviderFailed:
    return ProviderFailed("pf-1", "programmer-1", incarnation, provider, reason, retryable, retry_after, "t-1")


def parked(parked_for=1.0, kind="providers") -> ParkCheck:
    return ParkCheck("pk-1", "programmer-1", "t-1", parked_for, kind)


ASKING = Policy(**{**P.model_dump(), "ask_operator": True, "operator_timeout": 3600.0})
OVER = SpendView(run_usd=0.52, task_tokens=900, limits={"run_usd": 0.5, "task_tokens": 1000})
RAISED = SpendView(run_usd=0.52, limits={"run_usd": 1.0})


def spent(v: LadderView, spend: SpendView) -> LadderView:
    return v.model_copy(update={"spend": spend})


def asking(v: LadderView) -> LadderView:
    return v.model_copy(update={"policy": ASKING})

CASES = [
    # -- a child failed: the guards ------------------------------------------------------------
    ("duplicate alert (already handled)", failed(), view(alert_status="handled", task=task()),
     Ignore("duplicate_alert", "alert a-1 was already decided")),
    ("duplicate alert (restart already recorded)", failed(), view(recorded=["child_restart"], task=task()),
     Ignore("duplicate_alert", "alert a-1 was already decided")),
    ("stale incarnation", failed(incarnation="i-0"), view(task=task()),
     Ignore("stale_incarnation", "i-0 is no longer the current incarnation")),
    ("operator stopped it", failed(), view(stopped=True, task=task()),
     Ignore("operator_stopped", "an operator stopped programmer-1")),
    # -- the service lifecycle: always back, backoff only for unstable streaks ----------------
    ("idle failure: back at once", failed(task_id=None), view(),
     Restart("idle_failure", delay=0.0)),
    ("idle, stable incarnation: back at once, streak reset", failed(task_id=None), view(streak=0),
     Restart("idle_failure", delay=0.0)),
    ("idle, 2nd unstable failure in a row: backoff_initial", failed(task_id=None), view(streak=2, failures=(990, NOW)),
     Restart("idle_failure", delay=0.5)),
    ("idle, 4th unstable: 2 s", failed(task_id=None), view(streak=4, failures=(990, 995, NOW)),
     Restart("idle_failure", delay=2.0, crash_looping=True, new_episode=True)),
    ("idle, 3rd failure in the window: crash-looping, a new episode", failed(task_id=None),
     view(streak=0, failures=(950, 970, NOW), previous=970),
     Restart("idle_failure", delay=0.0, crash_looping=True, new_episode=True)),
    ("idle, still crash-looping: no second escalation", failed(task_id=None),
     view(streak=9, failures=(980, 990, NOW), previous=990, looping=True),
     Restart("idle_failure", delay=10.0, crash_looping=True, new_episode=False)),
    ("idle, a flag left from an old episode: one failure is no loop", failed(task_id=None),
     view(streak=0, failures=(NOW,), previous=900, looping=True),
     Restart("idle_failure", delay=0.0, crash_looping=False, new_episode=False)),
    ("idle, failures aged out of the window: not looping", failed(task_id=None),
     view(streak=0, failures=(900, 930, NOW)),
     Restart("idle_failure", delay=0.0)),
    ("task already ended: an idle failure", failed(), view(task=task(TaskState.DONE)),
     Restart("idle_failure", delay=0.0)),
    # -- the task ladder, level 1 -------------------------------------------------------------
    ("task in flight: restart with it", failed(), view(task=task(restarts=1)),
     Restart("restart_with_task", delay=0.0, with_task=True)),
    ("non-retryable: straight up, service back", failed(retryable=False, reason="authentication_error"),
     view(task=task()),
     Escalate("non_retryable", "non_retryable:authentication_error", restart=RESTART_BACK)),
    ("already switched: back to the top", failed(), view(task=task(restarts=1, switches=1)),
     Escalate("task_already_escalated", "task_already_escalated", restart=RESTART_BACK)),
    ("restarts exhausted: up", failed(), view(task=task(restarts=3)),
     Escalate("task_restarts_exhausted", "max_restarts_exceeded", restart=RESTART_BACK)),
    ("restarts exhausted at the top: switch", failed(), view(task=task(restarts=3), top=True, decider="daemon"),
     SwitchProvider("switch_provider", "ollama", 1, ("programmer-1",))),
    ("a switch is at once, whatever the unstable streak", failed(),
     view(task=task(restarts=3), top=True, decider="daemon", streak=4, failures=(990, 995, NOW)),
     SwitchProvider("switch_provider", "ollama", 1, ("programmer-1",))),
    ("switches exhausted at the top: fail, service back", failed(),
     view(task=task(restarts=3, switches=2), top=True, decider="daemon"),
     Fail("switches_exhausted", "max_provider_switches_exceeded", restart=RESTART_BACK)),
    # -- an escalation reaches an ancestor ------------------------------------------------------
    ("escalation below the top: pass up", escalated(), view(task=task(TaskState.ESCALATED, restarts=3)),
     Escalate("pass_up", "max_restarts_exceeded")),
    ("escalation at the top: switch to the next provider", escalated(),
     view(task=task(TaskState.ESCALATED, restarts=3), top=True, decider="root"),
     SwitchProvider("switch_provider", "ollama", 1, ("programmer-1",))),
    ("second switch goes on round the chain", escalated(),
     view(task=task(TaskState.ESCALATED, restarts=3, switches=1), top=True, decider="root", provider="ollama"),
     SwitchProvider("switch_provider", "anthropic", 2, ("programmer-1",))),
    ("switches exhausted: permanent failure", escalated(),
     view(task=task(TaskState.ESCALATED, switches=2), top=True, decider="root"),
     Fail("switches_exhausted", "max_provider_switches_exceeded")),
    ("escalation of a task that already ended", escalated(), view(task=task(TaskState.FAILED), top=True),
     Ignore("task_finished", "task t-1 is failed, not held for a decision")),
    ("escalation of an unknown task", escalated(task_id="t-x"), view(task=None, top=True),
     Ignore("task_finished", "task t-x is unknown, not held for a decision")),
    ("the same escalation twice at a parent", escalated(),
     view(task=task(TaskState.ESCALATED), recorded=["escalation:director-code->architect"]),
     Ignore("duplicate_escalation", "escalation a-1 was already decided here")),
    ("the same escalation twice at the top", escalated(),
     view(task=task(TaskState.ESCALATED), recorded=["llm_change"], top=True, decider="root"),
     Ignore("duplicate_escalation", "escalation a-1 was already decided here")),
    # -- a process failure at the top never switches into a known outage -----------------------------
    ("restarts exhausted at the top, the next provider open: the one after it", failed(),
     hview(task=task(restarts=3), top=True, decider="daemon", chain=["anthropic", "ollama", "openai"],
           providers={"ollama": OUTAGE}),
     SwitchProvider("switch_provider", "openai", 1, ("programmer-1",))),
    ("restarts exhausted at the top, the only other provider open: again on this one, after a backoff", failed(),
     hview(task=task(restarts=3), top=True, decider="daemon", providers={"ollama": OUTAGE}),
     SwitchProvider("stay_on_last_usable", "anthropic", 1, ("programmer-1",), delay=0.5)),
    ("restarts exhausted at the top, every provider open: parked, service back", failed(),
     hview(task=task(restarts=3), top=True, decider="daemon", providers={"anthropic": OUTAGE, "ollama": OUTAGE}),
     Park("all_providers_down", BOTH_DOWN, restart=RESTART_BACK)),
    ("escalation at the top, every provider open, on_all_down fail: permanent failure", escalated(),
     hview(task=task(TaskState.ESCALATED, restarts=3), top=True, decider="root", on_all_down="fail",
           providers={"anthropic": OUTAGE, "ollama": OUTAGE}),
     Fail("all_providers_down", BOTH_DOWN)),
    ("escalation at the top, a rate-limit hold on the next: passed over too", escalated(),
     hview(task=task(TaskState.ESCALATED, restarts=3), top=True, decider="root", providers={"ollama": HOLD}),
     SwitchProvider("stay_on_last_usable", "anthropic", 1, ("programmer-1",), delay=0.5)),
    ("crash loop below the top: pass up", escalated("crash_loop", None), view(),
     Escalate("crash_loop_passed_up", "max_restarts_exceeded", kind="crash_loop")),
    ("crash loop at the top: noted", escalated("crash_loop", None), view(top=True, decider="root"),
     Ignore("crash_loop_noted", "programmer-1 is crash-looping; its restarts go on at the cap")),
    # -- a provider failed: the healthy process is never killed for it ------------------------------
    ("provider: stale incarnation", pfailed(incarnation="i-0"), pview(task=task()),
     Ignore("stale_incarnation", "i-0 is no longer the current incarnation")),
    ("provider: the task ended meanwhile", pfailed(), pview(task=task(TaskState.CANCELLED)),
     Ignore("task_not_live", "task t-1 is not running")),
    ("provider: first failure, retried in place at once", pfailed(), pview(task=task()),
     RetryInPlace("provider_retry", delay=0.0)),
    ("provider: second failure, in place after the backoff", pfailed(), pview(task=task(restarts=1)),
     RetryInPlace("provider_retry", delay=0.5)),
    ("provider: retry-after longer than the backoff wins", pfailed(retry_after=2.5), pview(task=task(restarts=1)),
     RetryInPlace("provider_retry", delay=2.5)),
    ("provider: a short rate-limit hold is waited out, same provider", pfailed(reason="rate_limit_error", retry_after=2),
     pview(HOLD, task=task()), RetryInPlace("rate_limit_wait", delay=2.0)),
    ("provider: a long usage limit switches", pfailed(reason="usage_limit", retry_after=3600),
     pview(LONG_HOLD, task=task()), SwitchProvider("provider_open", "ollama", 1, in_place=True)),
    ("provider: an open provider skips level 1", pfailed(reason="provider_open"), pview(OUTAGE, task=task()),
     SwitchProvider("provider_open", "ollama", 1, in_place=True)),
    ("provider: a bad key is not retried on the same provider", pfailed(reason="authentication_error", retryable=False),
     pview(task=task()), SwitchProvider("request_error", "ollama", 1, in_place=True)),
    ("provider: retries exhausted, the next provider", pfailed(), pview(task=task(restarts=3)),
     SwitchProvider("provider_retries_exhausted", "ollama", 1, in_place=True)),
    ("provider: never back to an open one; the last usable again, as a switch", pfailed(provider="ollama"),
     pview(OUTAGE, task=task(restarts=3, switches=1), provider="ollama"),
     SwitchProvider("stay_on_last_usable", "ollama", 2, delay=1.0, in_place=True)),
    ("provider: every provider open, park", pfailed(reason="provider_open"), pview(OUTAGE, OUTAGE, task=task()),
     Park("all_providers_down", BOTH_DOWN)),
    ("provider: every provider open, fail at once", pfailed(reason="provider_open"),
     pview(OUTAGE, OUTAGE, task=task(), on_all_down="fail"), Fail("all_providers_down", BOTH_DOWN)),
    ("provider: the bound holds", pfailed(), pview(task=task(restarts=3, switches=2)),
     Fail("switches_exhausted", "max_provider_switches_exceeded")),
    ("provider: the bound, with one provider still answering", pfailed(provider="ollama"),
     pview(OUTAGE, CLOSED, task=task(restarts=3, switches=2), provider="ollama"),
     Fail("switches_exhausted", "max_provider_switches_exceeded")),
    ("provider: the bound, every provider open or failing last: the failure names them", pfailed(provider="ollama"),
     pview(OUTAGE, FAILING, task=task(restarts=3, switches=2), provider="ollama"),
     Fail("all_providers_down", "all_providers_down: anthropic open (3 failures in a row: overloaded_error), "
          "ollama closed (2 failures in a row: api_error)")),
    # -- a parked task looked at again ------------------------------------------------------------------
    ("park: the task is no longer parked", parked(), pview(OUTAGE, OUTAGE, task=task(TaskState.CANCELLED)),
     Ignore("park_task_gone", "task t-1 is no longer parked")),
    ("park: park_max passed", parked(600.0), pview(OUTAGE, OUTAGE, task=task(TaskState.PARKED)),
     Fail("park_expired", "parked_too_long: " + BOTH_DOWN.split(": ", 1)[1])),
    ("park: a provider is probing again, go on there", parked(), pview(OUTAGE, PROBING, task=task(TaskState.PARKED)),
     Resume("provider_back", "ollama")),
    ("park: still every provider open", parked(), pview(OUTAGE, OUTAGE, task=task(TaskState.PARKED)),
     Ignore("still_down", BOTH_DOWN.split(": ", 1)[1])),
    # -- spend: budgets the ladder obeys --------------------------------------------------------------
    ("budget: within every limit, the call goes", CallAsked("c-1", "programmer-1", "t-1"),
     spent(pview(task=task()), SpendView(run_usd=0.1, limits={"run_usd": 0.5})),
     Ignore("within_budget", "the call may go")),
    ("budget: the run's is spent, the task parks with its agent up", CallAsked("c-1", "programmer-1", "t-1"),
     spent(pview(task=task()), OVER), Park("budget_exceeded", "budget_exceeded: run_usd 0.52 of 0.5",
                                           kind="budget_exceeded")),
    ("budget: still spent, still parked", parked(kind="budget_exceeded"),
     spent(pview(task=task(TaskState.PARKED)), OVER), Ignore("budget_still_exceeded", "run_usd 0.52 of 0.5")),
    ("budget: raised, it goes on", parked(kind="budget_exceeded"),
     spent(pview(task=task(TaskState.PARKED)), RAISED), Resume("budget_raised", "anthropic")),
    ("budget: parked past operator_timeout, it ends", parked(86400.0, "budget_exceeded"),
     spent(pview(task=task(TaskState.PARKED)), OVER),
     Fail("operator_timeout", "budget_exceeded: nobody answered within 86400s")),
    # -- the human rung ---------------------------------------------------------------------------------
    ("ask_operator: a provider ladder's end asks a human first", pfailed(),
     asking(pview(task=task(restarts=3, switches=2))),
     Park("ask_operator", "max_provider_switches_exceeded", kind="awaiting_operator")),
    ("ask_operator: a process ladder's end asks a human first", escalated(),
     asking(view(decider="root", top=True, task=task(TaskState.ESCALATED, restarts=3, switches=2))),
     Park("ask_operator", "max_provider_switches_exceeded", kind="awaiting_operator")),
    ("ask_operator: a crash at the top parks the task and still brings the service back", failed(),
     asking(view(decider="root", top=True, task=task(restarts=3, switches=2))),
     Park("ask_operator", "max_provider_switches_exceeded", kind="awaiting_operator", restart=RESTART_BACK)),
    ("operator: nobody has answered yet", parked(5.0, "awaiting_operator"), pview(task=task(TaskState.PARKED)),
     Ignore("awaiting_operator", "waiting for `tron task approve` or `tron task fail`")),
    ("operator: approved on ollama", parked(5.0, "awaiting_operator"),
     pview(task=task(TaskState.PARKED)).model_copy(update={"approval": Approval(by="ops", provider="ollama")}),
     Resume("operator_approved", "ollama")),
    ("operator: nobody answered within operator_timeout", parked(3600.0, "awaiting_operator"),
     asking(pview(task=task(TaskState.PARKED))),
     Fail("operator_timeout", "awaiting_operator: nobody answered within 3600s")),
]


@pytest.mark.parametrize("what,event,v,expected", CASES, ids=[c[0] for c in CASES])
def test_decide(what, event, v, expected):
    assert decide(event, v, NOW, v.policy) == expected  # the policy the view carries (P, unless a row says)


def standing(*, alert_status="pending", recorded=(), incarnation="i-1", stopped=False, replacing=False,
             state=ServiceState.FAILED) -> Standing:
    return Standing(alert_status=alert_status, recorded=list(recorded), incarnation=incarnation, state=state,
                    stopped=stopped, replacing=replacing)


ASKED = RestartAsked("a-1", "programmer-1", "i-1")
ANSWERED = AlertAnswered("a-1", "programmer-1", "i-1", "director-code")

# The daemon's guard before it carries a decision out: no view, no clock, nothing decided again.
GUARD_CASES = [
    # -- a decided restart reaches the daemon ----------------------------------------------------------
    ("restart request stands", ASKED, standing(), Restart("admitted")),
    ("restart request stands after nobody took the alert", ASKED, standing(alert_status="undeliverable"),
     Restart("admitted")),
    ("restart request twice", ASKED, standing(alert_status="handled"),
     Ignore("duplicate_request", "alert a-1 already caused its restart")),
    ("restart request after another decider's", ASKED, standing(alert_status="handled", replacing=True),
     Ignore("duplicate_request", "alert a-1 already caused its restart")),
    ("restart request naming no alert, twice", ASKED, standing(alert_status=None, recorded=["child_restart"]),
     Ignore("duplicate_request", "alert a-1 already caused its restart")),
    ("restart request naming no alert", ASKED, standing(alert_status=None), Restart("admitted")),
    ("restart request for a replaced incarnation", RestartAsked("a-1", "programmer-1", "i-0"), standing(),
     Ignore("stale_request", "i-0 is not the current incarnation, or is already being replaced")),
    ("restart request while already being replaced", ASKED, standing(replacing=True),
     Ignore("stale_request", "i-1 is not the current incarnation, or is already being replaced")),
    ("restart request for a stopped service", ASKED, standing(stopped=True, state=ServiceState.STOPPED),
     Ignore("stopped_request", "programmer-1 is stopped")),
    ("restart request for a stopping service", ASKED, standing(state=ServiceState.STOPPING),
     Ignore("stopped_request", "programmer-1 is stopped")),
    # -- an ancestor answered an alert: did anything happen? ------------------------------------------
    ("answered and acted", ANSWERED, standing(alert_status="handled"), Ignore("acted", "director-code took alert a-1")),
    ("answered, restart under way", ANSWERED, standing(replacing=True), Ignore("acted", "director-code took alert a-1")),
    ("answered, incarnation already replaced", ANSWERED, standing(incarnation="i-2"),
     Ignore("acted", "director-code took alert a-1")),
    ("answered, service stopped meanwhile", ANSWERED, standing(stopped=True),
     Ignore("acted", "director-code took alert a-1")),
    ("answered without acting: next ancestor", ANSWERED, standing(),
     Escalate("answered_without_acting", "director-code answered but nothing changed")),
]


@pytest.mark.parametrize("what,event,st,expected", GUARD_CASES, ids=[c[0] for c in GUARD_CASES])
def test_still_stands(what, event, st, expected):
    assert still_stands(event, st) == expected


def test_every_case_of_the_table_is_reached_by_a_row():
    reached = {c[3].case for c in CASES} | {c[3].case for c in GUARD_CASES} | {"restart_without_task"}
    reached |= {"llm_advised_escalation"}  # test_advice_can_escalate_early_but_never_buy_a_restart
    assert set(case_ids()) == reached


def test_a_task_ends_within_the_bound_whatever_happens():
    """Drive one task through failures at the daemon as the top decider: it ends (fails)
    after exactly 1 + max_restarts + max_provider_switches attempts."""
    restarts = switches = 0
    attempts = 1
    provider = "anthropic"
    for _ in range(50):
        v = view(top=True, decider="daemon", task=task(restarts=restarts, switches=switches), provider=provider)
        d = decide(failed(), v, NOW, P)
        if isinstance(d, Fail):
            break
        attempts += 1
        if isinstance(d, Restart):
            assert d.with_task
            restarts += 1
        else:
            assert isinstance(d, SwitchProvider)
            switches += 1
            provider = d.to_provider
    assert attempts == worst_case_attempts(P) == 6


@pytest.mark.parametrize("prior,expected", [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (60, 10.0)])
def test_backoff_first_restart_is_immediate_then_doubles_to_the_cap(prior, expected):
    assert compute_backoff(prior, initial=0.5, factor=2, max_backoff=10, jitter=0) == expected


def test_backoff_jitter_stays_within_band_and_never_passes_the_cap():
    rng = random.Random(7)
    mid = [compute_backoff(2, initial=0.5, factor=2, max_backoff=10, jitter=0.2, rng=rng) for _ in range(200)]
    assert all(0.8 <= v <= 1.2 for v in mid) and len(set(mid)) > 100
    capped = [compute_backoff(9, initial=0.5, factor=2, max_backoff=10, jitter=0.2, rng=rng) for _ in range(200)]
    assert all(8.0 <= v <= 10.0 for v in capped)


# The crash-loop cap with the supervisor really running: tests/integration/test_ladder.py.


@pytest.mark.parametrize("chain,current,expected", [
    (["anthropic", "ollama"], "anthropic", "ollama"),
    (["anthropic", "ollama"], "ollama", "anthropic"),
    (["anthropic", "ollama", "openai"], "ollama", "openai"),
    (["anthropic", "ollama"], None, "anthropic"),
])
def test_next_provider_goes_round_the_chain(chain, current, expected):
    assert next_provider(chain, current) == expected


def test_within_counts_the_half_open_window():
    assert within([40, 41, 99, 100, 101], 100, 60) == [41, 99, 100]


def test_parse_advice():
    assert parse_advice("ESCALATE.\nthe provider is down") == ("escalate", "the provider is down")
    assert parse_advice("restart") == ("restart", "")
    assert parse_advice("maybe?") == (None, "")
    assert parse_advice("") == (None, "")


def test_advice_can_escalate_early_but_never_buy_a_restart():
    restart = Restart("restart_with_task", delay=0.5, with_task=True)
    folded = fold_advice(restart, "escalate")
    assert folded == Escalate("llm_advised_escalation", "llm_advised_escalation",
                              restart=Restart("restart_without_task", delay=0.5))
    assert fold_advice(restart, "restart") is restart
    assert fold_advice(restart, None) is restart
    up = Escalate("task_restarts_exhausted", "max_restarts_exceeded", restart=RESTART_BACK)
    assert fold_advice(up, "restart") is up  # the advisor cannot buy a restart the policy refused
    idle = Restart("idle_failure")
    assert fold_advice(idle, "escalate") is idle  # no task: nothing to escalate


@pytest.mark.parametrize("stable,streak", [
    ([], 0), ([False], 1), ([True], 0), ([False, False, True, False], 2), ([True, False, False], 0),
    ([False, False, False], 3),
])
def test_the_unstable_streak_ends_at_the_last_stable_incarnation(stable, streak):
    from tron.common.ladder import unstable_streak

    assert unstable_streak(stable) == streak


@pytest.mark.parametrize("latest,now,over", [(None, NOW, True), (NOW - 59.9, NOW, False), (NOW - 60, NOW, True),
                                             (NOW - 61, NOW, True), (NOW, NOW, False)])
def test_a_crash_loop_is_over_after_a_whole_quiet_window(latest, now, over):
    from tron.common.ladder import crash_loop_over

    assert crash_loop_over(latest, now, P) is over


# Issue 20, item 4: compute_backoff is defined for every input. backoff_factor = 1e308 made
# the 5th unstable failure raise OverflowError (float ** int), and programmer-2 stayed failed.
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("prior,initial,factor,max_backoff,jitter,expected", [
    (4, 0.5, 1e308, 10, 0.0, 10.0),  # the adversary's row: 1e308 ** 4 overflows
    (4, 0.5, 1e308, 10, 0.2, 10.0),
    (5, 0.5, 1e308, 10, 0.2, 10.0),
    (10**9, 0.5, 2, 10, 0.2, 10.0),  # a streak of a billion: the exponent is clamped
    (10**9, 0.5, 1e308, 10, 0.0, 10.0),
    (3, 0.5, 10**400, 10, 0.0, 10.0),  # an int too large for a float
    (3, 1e308, 1e308, 10, 0.0, 10.0),
    (2, 0.5, 1e308, 10, 1.0, 10.0),  # inf * (1 - 1) is nan: still the cap
    (3, 0.5, NAN, 10, 0.0, 10.0),
    (3, NAN, 2, 10, 0.0, 10.0),
    (3, INF, 2, 10, 0.0, 10.0),
    (3, 0.5, 2, 10, NAN, 10.0),
    (5, 0.5, 1e308, INF, 0.0, 86400.0),  # no cap given: a day at most
    (5, 0.5, 1e308, NAN, 0.0, 86400.0),
    (5, 0.5, 1e308, 1e308, 0.0, 86400.0),
    (5, 0.5, 1e308, -1, 0.0, 0.0),
    (3, -0.5, 2, 10, 0.0, 0.0),  # never below zero
    (3, 0.5, 10, 86400, 0.0, 50.0),  # Policy's largest factor: still exact below the cap
    (0, 0.5, 1e308, 10, 0.2, 0.0),  # the first restart is immediate whatever the factor
], ids=lambda v: "huge-int" if isinstance(v, int) and v > 10**20 else None)
def test_backoff_saturates_at_the_cap_whatever_it_is_given(prior, initial, factor, max_backoff, jitter, expected):
    got = compute_backoff(prior, initial=initial, factor=factor, max_backoff=max_backoff, jitter=jitter,
                          rng=random.Random(1))
    assert got == expected and isinstance(got, float)


def test_a_huge_backoff_factor_restarts_the_5th_unstable_failure_at_the_cap():
    """Through the ladder, a policy built without validation (as the overlay once allowed):
    the 5th unstable failure is a Restart at backoff_max, not an OverflowError."""
    huge = Policy.model_construct(**{**P.model_dump(), "backoff_factor": 1e308})
    d = decide(failed(task_id=None), view(streak=5, failures=(990, NOW)), NOW, huge)
    assert isinstance(d, Restart) and d.delay == P.backoff_max


# -- a failure to start that retrying cannot fix backs off to spawn_failed_backoff_max ------------


def spawn_failed_view(cause: str | None, streak: int, policy: Policy = P) -> LadderView:
    v = view(streak=streak).model_copy(update={"policy": policy})
    return v.model_copy(update={"service": v.service.model_copy(update={"failure_cause": cause})})


@pytest.mark.parametrize("cause,streak,expected", [
    # the first restart is immediate whatever the cause: backoff is for repeated failures
    ("missing_binary", 1, 0.0),
    # the same doubling as a crash below the normal cap ...
    ("missing_binary", 2, 0.5),
    ("permission_denied", 5, 4.0),
    # ... but past backoff_max (10 s) it goes on growing, up to spawn_failed_backoff_max
    ("missing_binary", 7, 16.0),
    ("port_in_use", 9, 64.0),
    ("permission_denied", 11, 256.0),
    ("missing_binary", 12, 300.0),
    ("port_in_use", 60, 300.0),
    # a crash, or a failure to start for another reason, stays under the normal cap
    (None, 11, 10.0),
    ("cannot_start", 11, 10.0),
    ("process_exit", 60, 10.0),
])
def test_a_lasting_spawn_failure_backs_off_to_the_longer_cap(cause, streak, expected):
    decision = decide(failed(task_id=None, reason="spawn_failed"), spawn_failed_view(cause, streak), NOW, P)
    assert isinstance(decision, Restart) and decision.case == "idle_failure"
    assert decision.delay == pytest.approx(expected)


@pytest.mark.parametrize("spawn_cap,backoff_max,expected", [
    (300.0, 10.0, 300.0),
    (60.0, 10.0, 60.0),
    # a cap below backoff_max never makes a lasting failure retried more often than a crash
    (1.0, 10.0, 10.0),
    (0.0, 0.0, 0.0),
])
def test_the_spawn_failed_cap_is_never_below_backoff_max(spawn_cap, backoff_max, expected):
    policy = Policy(**{**P.model_dump(), "spawn_failed_backoff_max": spawn_cap, "backoff_max": backoff_max})
    decision = decide(failed(task_id=None, reason="spawn_failed"), spawn_failed_view("missing_binary", 60, policy),
                      NOW, policy)
    assert decision.delay == pytest.approx(expected)


def test_a_lasting_spawn_failure_with_a_task_in_flight_backs_off_to_the_longer_cap_too():
    v = spawn_failed_view("port_in_use", 12).model_copy(update={"task": task()})
    decision = decide(failed(reason="spawn_failed"), v, NOW, P)
    assert isinstance(decision, Restart) and decision.case == "restart_with_task" and decision.delay == 300.0


@pytest.mark.parametrize("value", [-1.0, 86400.1, float("inf"), "300", True])
def test_spawn_failed_backoff_max_is_bounded_and_strict(value):
    with pytest.raises(ValueError, match="spawn_failed_backoff_max"):
        Policy(spawn_failed_backoff_max=value)


def test_spawn_failed_backoff_max_defaults_to_five_minutes():
    assert Policy().spawn_failed_backoff_max == 300.0


def test_every_event_type_has_a_table_and_decide_takes_it():
    """decide() picks a table by a branch per event type and case_ids() reads TABLE: both
    must know every Event (mypy checks the branches; this checks TABLE)."""
    import typing

    from tron.common import ladder

    assert set(ladder.TABLE) == set(typing.get_args(ladder.Event))
    with pytest.raises(AssertionError):
        decide("not an event", view(), NOW, P)  # a wrong type fails loudly, never answers None
