"""Transports that carry requests as Flower records, encoded once per round."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

from flwr.app import RecordDict

from radfed.server.federation.transport import Transport
from radfed.shared.messages import Payload, from_record, to_record


class EncodedTransport(Transport):
    """A transport whose sites receive Flower ``RecordDict``s (in process or over Flower)."""

    @abstractmethod
    def _exchange(self, requests: Mapping[str, RecordDict]) -> dict[str, RecordDict]:
        """Deliver one encoded request per site and collect the encoded replies."""

    def _deliver(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        encoded = to_record(request)
        replies = self._exchange(dict.fromkeys(sites, encoded))
        return {site: from_record(rec) for site, rec in replies.items()}
