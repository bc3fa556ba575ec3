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

    def _deliver_each(self, requests: dict[str, Payload]) -> dict[str, Payload]:
        encoded: dict[int, RecordDict] = {}  # a request sent to several sites: encoded once
        records = {}
        for site, request in requests.items():
            if id(request) not in encoded:
                encoded[id(request)] = to_record(request)
            records[site] = encoded[id(request)]
        replies = self._exchange(records)
        return {site: from_record(rec) for site, rec in replies.items()}
