"""A peer's services: small classes, each with ``async def run(self, *, task_status)`` that calls ``started()`` once
ready; :meth:`p2pcompute.node.Node.run` wires them, in order, into one nursery.

- :mod:`.changes`: wakes whoever waits for the market or reputation to change.
- :mod:`.adverts`: adverts received over gossip into the market (validator, expiry); our own adverts (publish,
  re-advertise, DHT capability records).
- :mod:`.evidence`: evidence of cheating over gossip (validator, recheck queue, publish).
- :mod:`.sync`: advert sync, both sides (``/p2pcompute/adverts-sync/1.0.0``).
- :mod:`.status`: the local status and metrics endpoint.
"""
