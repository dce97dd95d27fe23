"""The domain: Valkyrie's rules as pure functions and data (no NATS, no event loop, no clock).

* :mod:`.intake`: parse and check a submission, derive ids, build the record;
* :mod:`.lifecycle`: job and runner transitions, slot accounting, the liveness judgement;
* :mod:`.scheduling`: placement, the dispatch queue, priorities and fair shares, the runner index;
* :mod:`.explain`: why a job waits or went where it went;
* :mod:`.modes`, :mod:`.health`, :mod:`.fallback`, :mod:`.config_plan`: integration modes,
  health evaluation, automatic fallback, planning a config change.

Each is imported by module (``from valkyrie.domain.lifecycle import dispatch_job``); this package
exports nothing itself, so importing one rule loads no other.
"""

__all__: list[str] = []
