"""The Flower ClientApp: a thin shell over :class:`~radfed.client.site.SiteWorker`.

In the Deployment Engine a hospital's SuperNode is started with its own settings::

    flower-supernode ... --node-config "site-name='hospital_a' data-dir='/data' min-cell=3"

Keys: ``site-name``, ``data-dir`` (required); ``cache-dir``, ``min-cell``,
``max-param-fraction``, ``jobs`` (optional). The privacy limits are the site's own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from radfed.client.site import SiteSettings, SiteWorker
from radfed.shared.errors import SiteDataError
from radfed.shared.messages import from_record, to_record
from radfed.shared.privacy import PrivacyPolicy


def settings_from_node_config(context: Context) -> SiteSettings:
    """A SuperNode's site settings from its ``--node-config``."""
    cfg = context.node_config
    missing = [k for k in ("site-name", "data-dir") if k not in cfg]
    if missing:
        raise SiteDataError(f"SuperNode node-config lacks {missing}; see radfed.client.app")
    policy = PrivacyPolicy(
        min_cell=int(cfg.get("min-cell", PrivacyPolicy.min_cell)),
        max_param_fraction=float(cfg.get("max-param-fraction", PrivacyPolicy.max_param_fraction)),
    )
    cache = cfg.get("cache-dir")
    return SiteSettings(
        name=str(cfg["site-name"]),
        data_dir=Path(str(cfg["data-dir"])),
        privacy=policy,
        cache_dir=Path(str(cache)) if cache else None,
        jobs=int(cfg.get("jobs", 1)),
    )


def make_client_app(
    settings_of: Callable[[Context], SiteSettings] = settings_from_node_config,
) -> ClientApp:
    """A ClientApp whose site settings come from ``settings_of(context)``."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        worker = SiteWorker(settings_of(context))
        reply = worker.handle(from_record(msg.content))
        return Message(to_record(reply), reply_to=msg)

    return app


app = make_client_app()
