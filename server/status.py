"""``lungvl server status``: the run registry as rich tables (run overview, rounds, sites) or as JSON.

:func:`status_rows` gathers plain rows; :func:`render_status` turns them into :class:`rich.table.Table`
objects, ready for ``console.print(*tables)``. :func:`status_json` and :func:`runs_json` are the stable,
JSON-ready documents of ``lungvl server status --json`` and of the dashboard's ``/api/runs/{id}`` and
``/api/runs`` (one function behind both; keys documented there and in the README).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from rich.table import Table

from server.registry import Registry

MAX_METRIC_COLUMNS = 4
#: Version of the JSON documents below; raised when a key is removed or changes meaning (new keys may appear).
STATUS_SCHEMA_VERSION = 1
#: Run statuses after which nothing changes any more.
ENDED_STATUSES = ("finished", "stopped_budget", "failed")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def status_rows(registry: Registry, run_id: int | None = None) -> dict[str, Any] | None:
    """Everything the status view shows, as plain data.

    Args:
        registry: the run registry.
        run_id: the run; the latest run when ``None``.

    Returns:
        ``None`` when the registry holds no run, else ``{"summary", "rounds", "sites", "metric_names"}``:
        ``summary`` from :meth:`Registry.summary`; ``rounds`` the round dicts, each with ``epsilon``
        (client-level ε recorded in that round, or ``None``) and ``metrics`` (global metrics of that round);
        ``sites`` one dict per site with ``site``, ``ok``, ``failed`` (not ok), ``examples``, ``last_status``,
        ``last_reason``, ``epsilon`` (latest patient-level ε or ``None``); ``metric_names`` the global
        metric columns shown; ``sampling`` how sites were drawn (``None`` for a run without a server
        config); ``reproducible_noise`` whether the run's noise was seeded (not private).

    Raises:
        RegistryError: ``run_id`` given but unknown.
    """
    if run_id is None:
        latest = registry.latest_run()
        if latest is None:
            return None
        run_id = int(latest["id"])
    summary = registry.summary(run_id)
    client_eps: dict[int, float] = {}
    site_eps: dict[str, float] = {}
    for row in registry.privacy(run_id):
        if row["level"] == "client":
            client_eps[row["round"]] = row["epsilon"]
        else:
            site_eps[row["site_name"]] = row["epsilon"]
    per_round: dict[int, dict[str, float]] = {}
    for m in registry.metrics(run_id, scope="global"):
        per_round.setdefault(m["round"], {})[m["name"]] = m["value"]
    names = sorted({n for values in per_round.values() for n in values})[:MAX_METRIC_COLUMNS]
    rounds = [
        {**r, "epsilon": client_eps.get(r["round"]), "metrics": per_round.get(r["round"], {})}
        for r in registry.rounds(run_id)
    ]
    sites: dict[str, dict[str, Any]] = {}
    for p in registry.participation(run_id):
        key = p["site_name"] or p["node_id"]
        site = sites.setdefault(key, {"site": key, "ok": 0, "failed": 0, "examples": 0, "statuses": Counter()})
        site["ok" if p["status"] == "ok" else "failed"] += 1
        site["examples"] += p["num_examples"] if p["status"] == "ok" else 0
        site["statuses"][p["status"]] += 1
        site["last_status"], site["last_reason"] = p["status"], p["reason"]
    for key, site in sites.items():
        site["epsilon"] = site_eps.get(key)
    server = (summary["run"].get("config") or {}).get("server") or {}
    return {
        "summary": summary,
        "rounds": rounds,
        "sites": list(sites.values()),
        "metric_names": names,
        "sampling": _sampling(server),
        "reproducible_noise": bool(server.get("reproducible_noise", False)),
    }


def _sampling(server: dict[str, Any]) -> str | None:
    """How the run drew its sites, from its resolved server config (None when the run has none)."""
    if not server:
        return None
    mode = server.get("site_sampling", "fixed")  # runs from before site_sampling drew a fixed number
    q = server.get("fraction_train", 1.0)
    if mode == "poisson":
        return f"poisson, q={q:g} per site (the DP mean divides by q·N)"
    return f"fixed, fraction {q:g} (at least min_sites={server.get('min_sites')})"


def render_status(registry: Registry, run_id: int | None = None, *, max_rounds: int = 20) -> list[Table]:
    """Tables for one run: overview, the last ``max_rounds`` rounds, and sites.

    Args:
        registry: the run registry.
        run_id: the run; the latest run when ``None``.
        max_rounds: at most this many (most recent) rounds are listed.

    Returns:
        ``[overview, rounds, sites]``; a single table saying so when the registry holds no run.
    """
    data = status_rows(registry, run_id)
    if data is None:
        empty = Table(title="lungvl runs")
        empty.add_column("registry")
        empty.add_row(f"no runs recorded in {registry.url}")
        return [empty]
    s, run = data["summary"], data["summary"]["run"]

    not_private = " — noise reproducible: not private" if data["reproducible_noise"] else ""
    overview = Table(title=f"Run {run['name']} (#{run['id']}){not_private}", show_header=False)
    overview.add_column("field", style="bold")
    overview.add_column("value")
    eps = "-" if s["epsilon"] is None else f"{s['epsilon']:.3f} (δ={s['delta']:.1e})"
    site_eps = "-" if s["max_site_epsilon"] is None else f"{s['max_site_epsilon']:.3f} ({s['max_site_epsilon_site']})"
    for field, value in (
        ("status", run["status"]),
        ("created", _fmt(run["created_at"])),
        ("seed", _fmt(run["seed"])),
        ("site sampling", data["sampling"] or "-"),
        (
            "noise",
            "noise reproducible: not private (seeded from the run's seed)"
            if data["reproducible_noise"]
            else ("secret (OS entropy, never stored)" if data["sampling"] else "-"),
        ),
        ("rounds completed", f"{s['rounds_done']} of {s['rounds_recorded']} recorded"),
        ("sites seen", f"{len(s['sites_seen'])}: {', '.join(s['sites_seen'])}" if s["sites_seen"] else "0"),
        ("site failures", str(s["failures"])),
        ("client-level ε", eps),
        ("max site ε (patient-level)", site_eps),
        ("latest global metrics", ", ".join(f"{k}={_fmt(v)}" for k, v in s["latest_global_metrics"].items()) or "-"),
    ):
        overview.add_row(field, value)

    shown = data["rounds"][-max_rounds:]
    rounds = Table(title="Rounds", caption=f"last {len(shown)} of {len(data['rounds'])} rounds")
    for col in ("round", "status", "sampled", "replied", "failed", "update norm", "ε", *data["metric_names"]):
        rounds.add_column(col, justify="left" if col == "status" else "right")
    for r in shown:
        style = "red" if r["status"] == "failed" else ("yellow" if r["status"] == "running" else None)
        rounds.add_row(
            str(r["round"]),
            r["status"],
            str(r["sites_sampled"]),
            _fmt(r["sites_replied"]),
            _fmt(r["sites_failed"]),
            _fmt(r["update_norm"]),
            _fmt(r["epsilon"]),
            *(_fmt(r["metrics"].get(n)) for n in data["metric_names"]),
            style=style,
        )

    sites = Table(title="Sites")
    for col in ("site", "ok", "not ok", "examples", "last status", "last reason", "sample ε"):
        sites.add_column(col, justify="right" if col in ("ok", "not ok", "examples", "sample ε") else "left")
    for site in data["sites"]:
        sites.add_row(
            site["site"],
            str(site["ok"]),
            str(site["failed"]),
            str(site["examples"]),
            site["last_status"],
            site["last_reason"][:60] or "-",
            _fmt(site["epsilon"]),
            style=None if site["last_status"] == "ok" else "red",
        )
    return [overview, rounds, sites]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _planned(run: dict[str, Any]) -> tuple[int | None, float | None]:
    """``(rounds planned, client-level ε budget)`` from the run's resolved server config (None: unknown / none)."""
    server = (run.get("config") or {}).get("server") or {}
    rounds = server.get("rounds")
    budget = server.get("target_epsilon")
    return (
        int(rounds) if isinstance(rounds, int) else None,
        float(budget) if isinstance(budget, int | float) and budget > 0 else None,
    )


def _run_head(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(run["id"]),
        "name": run["name"],
        "status": run["status"],
        "ended": run["status"] in ENDED_STATUSES,
        "created_at": _iso(run["created_at"]),
        "finished_at": _iso(run["finished_at"]),
        "seed": run["seed"],
    }


def runs_json(registry: Registry) -> dict[str, Any]:
    """Every run of the registry, newest first: ``server status --json --all`` and ``GET /api/runs``.

    Returns:
        ``{"schema_version", "registry", "runs"}``; each run has ``id``, ``name``, ``status``, ``ended``
        (status is ``finished``, ``stopped_budget`` or ``failed``), ``created_at``/``finished_at`` (ISO 8601,
        ``finished_at`` null while running), ``seed``, ``rounds_planned`` (null when the run has no
        server config), ``rounds_completed``.
    """
    runs = []
    for run in reversed(registry.runs()):
        planned, _ = _planned(run)
        done = sum(r["status"] == "completed" for r in registry.rounds(int(run["id"])))
        runs.append({**_run_head(run), "rounds_planned": planned, "rounds_completed": done})
    return {"schema_version": STATUS_SCHEMA_VERSION, "registry": registry.url, "runs": runs}


def status_json(registry: Registry, run_id: int | None = None) -> dict[str, Any] | None:
    """One run as a JSON-ready dict: ``server status --json`` and ``GET /api/runs/{id}``.

    Keys (stable within ``schema_version``; all times ISO 8601 UTC, missing values ``null``):

    - ``schema_version``, ``registry`` (URL, password hidden);
    - ``run``: ``id``, ``name``, ``status`` (``running``, ``finished``, ``stopped_budget``, ``failed``),
      ``ended``, ``created_at``, ``finished_at``, ``seed``;
    - ``progress``: ``rounds_planned``, ``rounds_completed``, ``rounds_recorded``, ``last_completed_round``;
    - ``privacy``: ``epsilon`` (client-level ε spent so far), ``delta``, ``epsilon_budget`` (the server's
      ``target_epsilon``; null when none), ``budget_used`` (ε / budget, null without a budget),
      ``max_site_epsilon`` and ``max_site_epsilon_site`` (patient-level DP-SGD at the sites), ``sampling``,
      ``reproducible_noise`` (true: seeded noise, not private);
    - ``rounds``: one per recorded round, in order: ``round``, ``status`` (``running``, ``completed``,
      ``failed``), ``sampled``, ``replied``, ``failed``, ``update_norm``, ``epsilon`` (client-level ε after
      the round), ``started_at``, ``ended_at``, ``metrics`` (global metrics), ``sites`` (site → its
      participation status in that round: ``ok``, ``failed``, ``rejected``, ``timeout``...);
    - ``sites``: one per site seen: ``site``, ``ok``, ``not_ok``, ``examples``, ``statuses`` (status →
      count), ``last_status``, ``last_reason``, ``epsilon`` (latest patient-level ε);
    - ``failures``: every participation that was not ``ok``: ``round``, ``site``, ``status``, ``reason``;
    - ``metric_names``: every global metric name recorded; ``latest_global_round`` and
      ``latest_global_metrics``.

    Args:
        registry: the run registry.
        run_id: the run; the latest run when ``None``.

    Returns:
        The document, or ``None`` when the registry holds no run.

    Raises:
        RegistryError: ``run_id`` given but unknown.
    """
    data = status_rows(registry, run_id)
    if data is None:
        return None
    s = data["summary"]
    run = s["run"]
    planned, budget = _planned(run)
    per_round: dict[int, dict[str, str]] = {}
    failures = []
    for p in registry.participation(int(run["id"])):
        site = p["site_name"] or p["node_id"]
        per_round.setdefault(p["round"], {})[site] = p["status"]
        if p["status"] != "ok":
            failures.append({"round": p["round"], "site": site, "status": p["status"], "reason": p["reason"]})
    rounds = [
        {
            "round": r["round"],
            "status": r["status"],
            "sampled": r["sites_sampled"],
            "replied": r["sites_replied"],
            "failed": r["sites_failed"],
            "update_norm": r["update_norm"],
            "epsilon": r["epsilon"],
            "started_at": _iso(r["started_at"]),
            "ended_at": _iso(r["ended_at"]),
            "metrics": dict(r["metrics"]),
            "sites": per_round.get(r["round"], {}),
        }
        for r in data["rounds"]
    ]
    sites = [
        {
            "site": x["site"],
            "ok": x["ok"],
            "not_ok": x["failed"],
            "examples": x["examples"],
            "statuses": dict(x["statuses"]),
            "last_status": x["last_status"],
            "last_reason": x["last_reason"],
            "epsilon": x["epsilon"],
        }
        for x in data["sites"]
    ]
    eps = s["epsilon"]
    return {
        "schema_version": STATUS_SCHEMA_VERSION,
        "registry": registry.url,
        "run": _run_head(run),
        "progress": {
            "rounds_planned": planned,
            "rounds_completed": s["rounds_done"],
            "rounds_recorded": s["rounds_recorded"],
            "last_completed_round": s["last_completed_round"],
        },
        "privacy": {
            "epsilon": eps,
            "delta": s["delta"],
            "epsilon_budget": budget,
            "budget_used": None if budget is None or eps is None else eps / budget,
            "max_site_epsilon": s["max_site_epsilon"],
            "max_site_epsilon_site": s["max_site_epsilon_site"],
            "sampling": data["sampling"],
            "reproducible_noise": data["reproducible_noise"],
        },
        "rounds": rounds,
        "sites": sites,
        "failures": failures,
        "metric_names": sorted({n for r in rounds for n in r["metrics"]}),
        "latest_global_round": s["latest_global_round"],
        "latest_global_metrics": dict(s["latest_global_metrics"]),
    }
