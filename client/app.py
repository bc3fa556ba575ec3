"""The Flower ClientApp: a thin shell over :class:`~radfed.client.site.SiteWorker`.

In the Deployment Engine a hospital's SuperNode is started with its own settings::

    flower-supernode ... --node-config "site-name='hospital_a' data-dir='/data' min-cell=3"

Keys: ``site-name``, ``data-dir`` (required); ``cache-dir``, ``min-cell``,
``max-param-fraction``, ``jobs``, ``state-dir`` (the site's secret, pinned studies,
split assignments and audit log) and ``approved-studies`` (comma-separated protocol
hashes: when set, no other study is answered) (optional). The privacy limits are the
site's own (docs/privacy.md).

Under Flower's own ``flwr-clientapp`` (``--isolation subprocess``) each message gets a
process of its own, so this module imports only Flower's app API: the site's code
(pandas, SciPy, the statistics) is imported when a message needs it, and a ``hello``
needs none of it. radfed's long-lived runner (:mod:`radfed.deploy.clientapp_runner`,
``--isolation process``) imports it once per site (docs/performance.md).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

if TYPE_CHECKING:
    from radfed.client.site import SiteSettings


def settings_from_node_config(context: Context) -> SiteSettings:
    """A SuperNode's site settings from its ``--node-config``."""
    from radfed.client.site import SiteSettings
    from radfed.shared.errors import SiteDataError
    from radfed.shared.privacy import PrivacyPolicy

    cfg = context.node_config
    missing = [k for k in ("site-name", "data-dir") if k not in cfg]
    if missing:
        raise SiteDataError(f"SuperNode node-config lacks {missing}; see radfed.client.app")
    policy = PrivacyPolicy(
        min_cell=int(cfg.get("min-cell", PrivacyPolicy.min_cell)),
        max_param_fraction=float(cfg.get("max-param-fraction", PrivacyPolicy.max_param_fraction)),
    )
    cache, state = cfg.get("cache-dir"), cfg.get("state-dir")
    approved = tuple(h.strip().lower() for h in str(cfg.get("approved-studies", "")).split(","))
    approved = tuple(h for h in approved if h)
    bad = [h for h in approved if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:
        raise SiteDataError(f"node-config approved-studies: {bad[0][:70]!r} is not a study hash")
    return SiteSettings(
        name=str(cfg["site-name"]),
        data_dir=Path(str(cfg["data-dir"])),
        privacy=policy,
        cache_dir=Path(str(cache)) if cache else None,
        jobs=int(cfg.get("jobs", 1)),
        state_dir=Path(str(state)) if state else None,
        approved_studies=approved,
        max_bootstrap=int(cfg.get("max-bootstrap", SiteSettings.max_bootstrap)),
        max_classifier_rounds=int(
            cfg.get("max-classifier-rounds", SiteSettings.max_classifier_rounds)
        ),
    )


#: Set to 1 to write where each message's time goes to stderr (the SuperNode's log).
TIMING_ENV = "RADFED_CLIENT_TIMING"


def _process_age() -> float:
    """Seconds since this process started (Linux; NaN elsewhere)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _answer(
    settings_of: Callable[[Context], SiteSettings], context: Context, msg: Message
) -> Message:
    timing = os.environ.get(TIMING_ENV, "") not in ("", "0")
    marks = [("start", _process_age())] if timing else []
    clock = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal clock
        if timing:
            now = time.perf_counter()
            marks.append((name, now - clock))
            clock = now

    from radfed.shared.messages import from_record, to_record

    request = from_record(msg.content)
    task = request.get("task", "?")
    mark("decode")
    if task == "hello" and settings_of is settings_from_node_config:
        # Who is this node: no data, no site code (a SuperNode's own settings).
        name = context.node_config.get("site-name")
        reply = {"site": str(name)} if name else {"error": "node-config lacks site-name"}
    elif task == "hello":
        reply = {"site": settings_of(context).name}
    else:
        from radfed.client.site import SiteWorker

        worker = SiteWorker(settings_of(context))
        mark("import")
        if timing and "protocol" in request:
            try:  # load the table first, to time it apart from the statistic
                worker.site(request["protocol"])
            except Exception:  # the handler below reports it properly
                pass
            mark("load")
        reply = worker.handle(request)
        mark("compute")
    record = to_record(reply)
    mark("encode")
    if timing:
        parts = " ".join(f"{stage}={seconds:.3f}" for stage, seconds in marks)
        site = context.node_config.get("site-name", context.node_config.get("partition-id", "?"))
        print(f"radfed timing: site={site} task={task} {parts}", file=sys.stderr)
    return Message(record, reply_to=msg)


def make_client_app(
    settings_of: Callable[[Context], SiteSettings] = settings_from_node_config,
) -> ClientApp:
    """A ClientApp whose site settings come from ``settings_of(context)``."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _answer(settings_of, context, msg)

    return app


app = make_client_app()
