"""The independent checker of a night's timeline (sim/checker.py), on hand-made timelines.

One clean timeline where every criterion holds, then one variant per violation that breaks exactly that
criterion; each violation text must name the tasks and the times involved. Pure: no Redis.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from clawq.broker.config import Config
from clawq.sim.checker import CRITERIA, BreakerRules, Check, Run, TaskFinal, Timeline, check_all

CODING = ("codex", "sonnet")
PROVIDER = {"codex": "openai", "sonnet": "anthropic", "opus": "anthropic", "gemini3": "google"}


def _run(run_id: str, task_id: int, board: str, model: str, run_count: int, start: float, end: float | None,
         outcome: str | None) -> Run:
    return Run(task_id=task_id, board=board, model=model, provider=PROVIDER.get(model, "p-" + model), run_id=run_id,
               run_count=run_count, start=start, end=end, outcome=outcome)


def _base_runs() -> dict[str, Run]:
    """Board web: task 1 follows up once then is done, then task 2. Board api: task 3 fails, then task 4."""
    runs = [
        _run("r1a", 1, "web", "codex", 1, 0.0, 10.0, "follow_up"),
        _run("r1b", 1, "web", "codex", 2, 10.0, 20.0, "done"),  # touches r1a: end == start is fine
        _run("r2", 2, "web", "opus", 1, 20.0, 30.0, "done"),
        _run("r3a", 3, "api", "sonnet", 1, 0.0, 5.0, "rate_limited"),
        _run("r3b", 3, "api", "sonnet", 1, 5.0, 15.0, "failed"),
        _run("r3c", 3, "api", "sonnet", 1, 15.0, 25.0, "timeout"),
        _run("r4", 4, "api", "sonnet", 1, 25.0, 35.0, "done"),
    ]
    return {r.run_id: r for r in runs}


def _base_tasks() -> dict[int, TaskFinal]:
    tasks = [
        TaskFinal(1, "web", "in_review", 2, CODING, ("r1a",)),
        TaskFinal(2, "web", "in_review", 1, ("opus",)),
        TaskFinal(3, "api", "failed", 1, CODING),
        TaskFinal(4, "api", "in_review", 1, CODING),
    ]
    return {t.task_id: t for t in tasks}


def _notes(tasks: list[TaskFinal], summaries: int) -> list[dict[str, Any]]:
    """``summaries`` summaries, then exactly one alert per in_review / failed task."""
    notes: list[dict[str, Any]] = [{"kind": "summary", "text": f"summary {i}", "at": 10.0 * i}
                                   for i in range(1, summaries + 1)]
    notes += [{"kind": t.status, "task_id": t.task_id, "board": t.board, "text": f"task {t.task_id}"}
              for t in tasks if t.status in ("in_review", "failed")]
    return notes


def _tl(runs: dict[str, Run] | None = None, tasks: dict[int, TaskFinal] | None = None, **kw: Any) -> Timeline:
    """The clean timeline, or a variant of it; enough summaries for its active time unless told."""
    task_list = list((tasks or _base_tasks()).values())
    started, finished = kw.pop("started", 0.0), kw.pop("finished", 35.0)
    interval = kw.pop("summary_interval_s", 10.0)
    notes = kw.pop("notifications", None)
    if notes is None:
        notes = _notes(task_list, max(1, int((finished - started) // interval)))
    return Timeline(
        tasks=task_list,
        runs=list((runs or _base_runs()).values()),
        model_caps=kw.pop("model_caps", {"codex": 1, "sonnet": 1, "opus": 1}),
        provider_caps=kw.pop("provider_caps", {"openai": 2, "anthropic": 2}),
        global_cap_at=kw.pop("global_cap_at", lambda ts: 3),
        notifications=notes,
        started=started,
        finished=finished,
        summary_interval_s=interval,
        idle_limit_s=kw.pop("idle_limit_s", 30.0),
        max_runs=kw.pop("max_runs", 5),
        breaker=kw.pop("breaker", None),
    )


def _only_failing(tl: Timeline, name: str) -> Check:
    """The timeline breaks exactly criterion ``name``; returns its check."""
    results = check_all(tl)
    failing = {n: c.violations for n, c in results.items() if not c.ok}
    assert set(failing) == {name}, failing
    check = results[name]
    assert check.ok is False
    assert check.violations
    assert check.as_dict()["ok"] is False
    return check


# -- the clean night ---------------------------------------------------------------------------------------
def test_clean_timeline_every_criterion_holds() -> None:
    results = check_all(_tl())
    assert list(results) == list(CRITERIA) == [
        "completed_without_jamming", "one_per_board_fifo", "llm_limits_respected",
        "every_task_reported", "follow_up_same_task", "reports_and_alerts_sent", "provider_outage_contained",
    ]
    for name, check in results.items():
        assert check.ok is True, (name, check.violations)
        assert check.violations == []
    assert results["completed_without_jamming"].detail == {"tasks": 4, "wall_s": 35.0}
    assert results["one_per_board_fifo"].detail == {"boards": 2}
    assert results["llm_limits_respected"].detail == {"model_peaks": {"codex": 1, "opus": 1, "sonnet": 1}}
    assert results["every_task_reported"].detail == {"runs": 7}
    assert results["follow_up_same_task"].detail == {"follow_ups": 1}
    assert results["reports_and_alerts_sent"].detail == {"summaries": 3, "alerts": 4}
    assert results["reports_and_alerts_sent"].as_dict() == {"ok": True, "violations": [], "summaries": 3,
                                                            "alerts": 4}


# -- completed_without_jamming -----------------------------------------------------------------------------
def test_task_not_final_is_flagged() -> None:
    tasks = _base_tasks()
    tasks[5] = TaskFinal(5, "docs", "up_next", 0, CODING)
    check = _only_failing(_tl(tasks=tasks), "completed_without_jamming")
    assert check.violations == ["task 5 (docs) ended up_next, not final"]
    assert check.detail["tasks"] == 5


def test_idle_gap_with_unfinished_tasks_is_flagged() -> None:
    runs = _base_runs()
    runs["r2"] = replace(runs["r2"], start=80.0, end=90.0)  # nothing runs from 35 to 80 while task 2 waits
    check = _only_failing(_tl(runs=runs, finished=90.0), "completed_without_jamming")
    assert check.violations == ["nothing in progress from 35.000 to 80.000 (45.0s) while tasks [2] were unfinished"]


def test_idle_gap_at_the_start_is_flagged() -> None:
    check = _only_failing(_tl(started=-50.0), "completed_without_jamming")
    assert check.violations == [
        "nothing in progress from -50.000 to 0.000 (50.0s) while tasks [1, 2, 3, 4] were unfinished"]


def test_idle_gaps_not_flagged_when_short_or_when_nothing_was_unfinished() -> None:
    runs = _base_runs()
    runs["r2"] = replace(runs["r2"], start=60.0, end=70.0)  # a 25 s gap: under the 30 s idle limit
    assert check_all(_tl(runs=runs, finished=70.0))["completed_without_jamming"].ok
    # every task was final at 35; the queue then sat idle until 500: not a jam
    quiet = check_all(_tl(finished=500.0))
    assert all(c.ok for c in quiet.values()), {n: c.violations for n, c in quiet.items()}
    assert quiet["completed_without_jamming"].detail["wall_s"] == 500.0


# -- one_per_board_fifo ------------------------------------------------------------------------------------
def test_two_overlapping_runs_on_one_board_are_flagged() -> None:
    runs = _base_runs()
    runs["r2"] = replace(runs["r2"], start=15.0)  # task 2 starts while task 1's second run (10-20) is going
    check = _only_failing(_tl(runs=runs), "one_per_board_fifo")
    assert check.violations == ["board web ran task 1 (10.000-20.000) and task 2 (from 15.000) at once"]


def test_lower_task_id_after_a_higher_one_is_flagged() -> None:
    runs = _base_runs()
    runs["r4"] = replace(runs["r4"], start=5.0, end=15.0)  # task 4 jumps ahead of task 3's retries
    runs["r3b"] = replace(runs["r3b"], start=15.0, end=25.0)
    runs["r3c"] = replace(runs["r3c"], start=25.0, end=35.0)
    check = _only_failing(_tl(runs=runs), "one_per_board_fifo")
    assert check.violations == ["board api ran task 3 at 15.000 after task 4 (started 5.000): not lowest task_id first"]


def test_touching_runs_on_a_board_are_fine_overlapping_by_a_hair_is_not() -> None:
    tasks = {1: TaskFinal(1, "web", "in_review", 1, CODING), 2: TaskFinal(2, "web", "in_review", 1, CODING)}
    touching = {"a": _run("a", 1, "web", "codex", 1, 0.0, 10.0, "done"),
                "b": _run("b", 2, "web", "codex", 1, 10.0, 20.0, "done")}
    results = check_all(_tl(runs=touching, tasks=tasks, finished=20.0))
    assert all(c.ok for c in results.values()), {n: c.violations for n, c in results.items()}
    assert results["llm_limits_respected"].detail["model_peaks"] == {"codex": 1}
    touching["b"] = replace(touching["b"], start=9.999)
    check = check_all(_tl(runs=touching, tasks=tasks, finished=20.0))["one_per_board_fifo"]
    assert check.violations == ["board web ran task 1 (0.000-10.000) and task 2 (from 9.999) at once"]


# -- llm_limits_respected ----------------------------------------------------------------------------------
def test_model_cap_exceeded_is_flagged() -> None:
    runs = _base_runs()
    runs["r3a"] = _run("r3a", 3, "api", "codex", 1, 0.0, 5.0, "rate_limited")  # codex 2 at once, cap 1
    check = _only_failing(_tl(runs=runs), "llm_limits_respected")
    assert check.violations == ["model codex had 2 runs in progress at 0.000 > cap 1"]
    assert check.detail["model_peaks"]["codex"] == 2


def test_provider_cap_exceeded_while_each_model_is_under_its_own() -> None:
    check = _only_failing(_tl(provider_caps={"openai": 2, "anthropic": 1}), "llm_limits_respected")
    assert check.violations == ["provider anthropic had 2 runs in progress at 20.000 > cap 1"]
    assert check.detail["model_peaks"] == {"codex": 1, "opus": 1, "sonnet": 1}  # every model within its cap 1


def _seven_at_once(at: float, cap_at: Any) -> Timeline:
    tasks = {i: TaskFinal(i, f"b{i}", "in_review", 1, (f"m{i}",)) for i in range(1, 8)}
    runs = {f"r{i}": _run(f"r{i}", i, f"b{i}", f"m{i}", 1, at, at + 60.0, "done") for i in range(1, 8)}
    return _tl(runs=runs, tasks=tasks, model_caps={}, provider_caps={}, global_cap_at=cap_at,
               started=at, finished=at + 60.0, summary_interval_s=600.0)


def test_global_cap_follows_the_night_window() -> None:
    cfg = Config()  # day cap 6; night 23:00-08:00 Buenos Aires cap 8
    zone = ZoneInfo("America/Argentina/Buenos_Aires")
    noon = datetime(2025, 1, 15, 12, 0, tzinfo=zone).timestamp()
    one_am = datetime(2025, 1, 15, 1, 0, tzinfo=zone).timestamp()
    assert cfg.global_cap_at(noon) == (6, False)
    assert cfg.global_cap_at(one_am) == (8, True)

    def cap_at(ts: float) -> int:
        return cfg.global_cap_at(ts)[0]

    check = _only_failing(_seven_at_once(noon, cap_at), "llm_limits_respected")
    assert len(check.violations) == 7  # one per run that started with 7 in progress
    assert f"7 runs in progress at {noon:.3f} (task 1 started) > global cap 6" in check.violations
    assert f"7 runs in progress at {noon:.3f} (task 7 started) > global cap 6" in check.violations
    night = check_all(_seven_at_once(one_am, cap_at))
    assert all(c.ok for c in night.values()), {n: c.violations for n, c in night.items()}


def test_run_on_a_model_outside_the_chain_is_flagged() -> None:
    runs = _base_runs()
    runs["r4"] = _run("r4", 4, "api", "gemini3", 1, 25.0, 35.0, "done")  # uncapped, but not in coding's chain
    check = _only_failing(_tl(runs=runs), "llm_limits_respected")
    assert check.violations == ["task 4 ran on gemini3, outside its chain ['codex', 'sonnet']"]


# -- every_task_reported -----------------------------------------------------------------------------------
def test_run_that_never_ended_is_flagged() -> None:
    runs = _base_runs()
    runs["r4"] = replace(runs["r4"], end=None, outcome=None)
    check = _only_failing(_tl(runs=runs), "every_task_reported")
    assert check.violations == ["run r4 of task 4 (from 25.000) never ended",
                                "task 4 is in_review but its last run ended None"]


def test_run_ended_without_outcome_is_flagged() -> None:
    runs = _base_runs()
    runs["r2"] = replace(runs["r2"], outcome=None)
    check = _only_failing(_tl(runs=runs), "every_task_reported")
    assert "run r2 of task 2 ended without an outcome" in check.violations


def test_in_review_task_whose_last_run_failed_is_flagged() -> None:
    runs = _base_runs()
    runs["r4"] = replace(runs["r4"], outcome="failed")
    check = _only_failing(_tl(runs=runs), "every_task_reported")
    assert check.violations == ["task 4 is in_review but its last run ended failed"]


def test_failed_task_whose_last_run_was_done_is_flagged() -> None:
    runs = _base_runs()
    runs["r3c"] = replace(runs["r3c"], outcome="done")
    check = _only_failing(_tl(runs=runs), "every_task_reported")
    assert check.violations == ["task 3 failed but its last run ended done"]


# -- follow_up_same_task -----------------------------------------------------------------------------------
def test_another_task_next_on_the_board_after_a_follow_up_is_flagged() -> None:
    runs = _base_runs()
    del runs["r1b"]  # task 1 asked for a follow-up, but task 2 ran next on web
    tasks = _base_tasks()
    tasks[1] = replace(tasks[1], run_count=1)
    check = _only_failing(_tl(runs=runs, tasks=tasks), "follow_up_same_task")
    assert check.violations == ["board web: after the follow-up of task 1 (10.000) ran task 2 at 20.000"]


def test_follow_up_with_nothing_after_it_is_flagged() -> None:
    runs = _base_runs()
    runs["r2"] = replace(runs["r2"], outcome="follow_up")
    tasks = _base_tasks()
    tasks[2] = replace(tasks[2], follow_up_run_ids=("r2",))
    check = _only_failing(_tl(runs=runs, tasks=tasks), "follow_up_same_task")
    assert check.violations == ["board web: after the follow-up of task 2 (30.000) ran nothing"]
    assert check.detail["follow_ups"] == 2


def test_run_count_not_incremented_after_a_follow_up_is_flagged() -> None:
    runs = _base_runs()
    runs["r1b"] = replace(runs["r1b"], run_count=1)
    check = _only_failing(_tl(runs=runs), "follow_up_same_task")
    assert check.violations == ["task 1: run_count 1 after a follow-up at run 1"]


def test_follow_up_missing_from_the_context_is_flagged() -> None:
    tasks = _base_tasks()
    tasks[1] = replace(tasks[1], follow_up_run_ids=())
    check = _only_failing(_tl(tasks=tasks), "follow_up_same_task")
    assert check.violations == ["task 1: follow-up of run r1a is not in its context"]


def test_follow_up_at_max_runs_going_to_review_is_fine() -> None:
    runs = _base_runs()
    runs["r1b"] = replace(runs["r1b"], outcome="follow_up")  # run 2 asks again; max_runs 2 -> in_review
    tasks = _base_tasks()
    tasks[1] = replace(tasks[1], follow_up_run_ids=("r1a", "r1b"))
    results = check_all(_tl(runs=runs, tasks=tasks, max_runs=2))
    assert all(c.ok for c in results.values()), {n: c.violations for n, c in results.items()}
    assert results["follow_up_same_task"].detail == {"follow_ups": 2}
    # the same night with max_runs 3: task 1 should have come back before task 2
    check = _only_failing(_tl(runs=runs, tasks=tasks, max_runs=3), "follow_up_same_task")
    assert check.violations == ["board web: after the follow-up of task 1 (20.000) ran task 2 at 20.000"]


# -- reports_and_alerts_sent -------------------------------------------------------------------------------
def test_too_few_summaries_is_flagged() -> None:
    notes = _notes(list(_base_tasks().values()), summaries=1)
    check = _only_failing(_tl(notifications=notes), "reports_and_alerts_sent")
    assert check.violations == ["1 summaries in 35s of activity, expected at least 2 (one per 10s)"]
    assert check.detail == {"summaries": 1, "alerts": 4}


def test_task_without_alert_is_flagged() -> None:
    notes = [n for n in _notes(list(_base_tasks().values()), 3) if n.get("task_id") != 2]
    check = _only_failing(_tl(notifications=notes), "reports_and_alerts_sent")
    assert check.violations == ["task 2 reached in_review with 0 alert(s), expected 1"]


def test_alert_of_the_wrong_kind_does_not_count() -> None:
    notes = [{**n, "kind": "in_review"} if n.get("task_id") == 3 else n
             for n in _notes(list(_base_tasks().values()), 3)]
    check = _only_failing(_tl(notifications=notes), "reports_and_alerts_sent")
    assert check.violations == ["task 3 reached failed with 0 alert(s), expected 1"]


def test_task_with_two_alerts_is_flagged() -> None:
    notes = _notes(list(_base_tasks().values()), 3)
    notes += [n for n in notes if n.get("task_id") == 3]
    check = _only_failing(_tl(notifications=notes), "reports_and_alerts_sent")
    assert check.violations == ["task 3 reached failed with 2 alert(s), expected 1"]
    assert check.detail["alerts"] == 5


def test_as_dict_caps_violations_at_fifty() -> None:
    check = Check(ok=False, violations=[f"v{i}" for i in range(80)], detail={"n": 1})
    doc = check.as_dict()
    assert doc == {"ok": False, "violations": [f"v{i}" for i in range(50)], "n": 1}
    assert len(check.violations) == 80


# -- provider_outage_contained -----------------------------------------------------------------------------
#: 3 faults within 60 s open a provider for 10 s; a failed probe doubles it, up to 40 s.
BREAKER = BreakerRules(failures=3, window_ms=60_000, cooldown_ms=10_000, max_cooldown_ms=40_000)


def _outage(*extra: Run, alerts: int | None = None) -> Check:
    """Anthropic fails 3 times (the 3rd ends at 3.0: open until 13.0); openai works meanwhile; ``extra`` runs."""
    runs = [
        _run("f1", 1, "b1", "opus", 1, 0.0, 1.0, "overloaded"),
        _run("f2", 2, "b2", "opus", 1, 0.0, 2.0, "overloaded"),
        _run("f3", 3, "b3", "sonnet", 1, 0.5, 3.0, "overloaded"),
        _run("ok1", 1, "b1", "codex", 1, 3.5, 6.0, "done"),
        *extra,
    ]
    openings = 1 + sum(1 for r in extra if r.outcome == "overloaded" and r.start >= 13.0)
    notes = [{"kind": "summary", "text": "s"}]
    notes += [{"kind": "provider_open", "provider": "anthropic"}] * (openings if alerts is None else alerts)
    tl = _tl(runs={r.run_id: r for r in runs}, breaker=BREAKER, notifications=notes)
    return CRITERIA["provider_outage_contained"](tl)


def test_outage_contained_one_probe_that_closes_it() -> None:
    probe = _run("p", 2, "b2", "opus", 1, 13.0, 14.0, "done")  # exactly at the end of the opening
    after = _run("a", 3, "b3", "opus", 1, 14.0, 15.0, "done")
    check = _outage(probe, after)
    assert check.ok, check.violations
    assert check.detail["providers"] == {"anthropic": {"openings": 1, "probes": 1, "failed_runs": 3}}


def test_outage_a_run_while_open_is_a_violation() -> None:
    check = _outage(_run("early", 2, "b2", "opus", 1, 12.9, 14.0, "done"))
    assert not check.ok and "while its breaker was open until 13.000" in check.violations[0]


def test_outage_a_second_run_while_the_probe_runs_is_a_violation() -> None:
    check = _outage(_run("p", 2, "b2", "opus", 1, 13.0, 16.0, "done"),
                    _run("second", 3, "b3", "sonnet", 1, 14.0, 15.0, "done"))
    assert not check.ok and "while the half-open probe p was still running" in check.violations[0]


def test_outage_a_failed_probe_reopens_it_for_twice_as_long() -> None:
    probe = _run("p", 2, "b2", "opus", 1, 13.0, 14.0, "overloaded")  # re-opened until 34.0
    assert not _outage(probe, _run("x", 3, "b3", "opus", 1, 33.0, 35.0, "done")).ok
    check = _outage(probe, _run("p2", 3, "b3", "opus", 1, 34.0, 35.0, "done"))
    assert check.ok, check.violations
    assert check.detail["providers"]["anthropic"] == {"openings": 2, "probes": 2, "failed_runs": 4}


def test_outage_a_lost_lease_tells_nothing_and_frees_the_probe_slot() -> None:
    reaped = _run("p", 2, "b2", "opus", 1, 13.0, 14.0, "timeout")
    reaped = Run(**{**reaped.__dict__, "detail": "no heartbeat: lease expired"})
    check = _outage(reaped, _run("p2", 3, "b3", "opus", 1, 14.5, 15.0, "done"))
    assert check.ok, check.violations
    assert check.detail["providers"]["anthropic"]["probes"] == 2


def test_outage_faults_outside_the_window_do_not_open_it() -> None:
    runs = [_run(f"f{i}", i, f"b{i}", "opus", 1, 40.0 * i, 40.0 * i + 1, "overloaded") for i in range(3)]
    runs.append(_run("next", 9, "b9", "opus", 1, 81.5, 82.0, "done"))
    tl = _tl(runs={r.run_id: r for r in runs}, breaker=BREAKER, notifications=[])
    assert CRITERIA["provider_outage_contained"](tl).ok


def test_outage_each_opening_needs_its_alert() -> None:
    check = _outage(alerts=0)
    assert not check.ok and "1 opening(s) but 0 provider_open alert(s)" in check.violations[0]


def test_outage_criterion_is_vacuous_without_a_breaker() -> None:
    tl = _tl(runs={"x": _run("x", 1, "b1", "opus", 1, 0.0, 1.0, "overloaded")})
    assert CRITERIA["provider_outage_contained"](tl).ok
