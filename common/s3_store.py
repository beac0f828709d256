"""s3fs as the store uses it: a failure to reach the endpoint is `StoreUnreachable` (an OSError, as a local
disk's failures are; botocore's connection errors are none), and in a process that rides out outages
(`store.ride_out_outages`) such a call is retried until the store is back or the patience is spent. Every S3
call, listing, reading or writing, goes through `_call_s3`. Imported on the first s3:// URL (s3fs is slow to
import); a module of its own so that its filesystems pickle by reference."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import botocore.exceptions
import s3fs

from common import store

UNREACHABLE = (
    botocore.exceptions.ConnectionError,  # refused, or timed out while connecting
    botocore.exceptions.HTTPClientError,  # the connection dropped, or timed out mid-call
    aiohttp.ClientConnectionError,
)


class S3(s3fs.S3FileSystem):
    async def _call_s3(self, method, *args, **kwargs):
        deadline = None
        while True:
            try:
                out = await super()._call_s3(method, *args, **kwargs)
            except UNREACHABLE as err:
                if deadline is None:
                    deadline = time.monotonic() + store.patience_s()
                if time.monotonic() >= deadline:
                    raise store.StoreUnreachable(str(err) or type(err).__name__) from err
                store.outage(err, self._endpoint())
                await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                continue
            if store.outage_seen():
                store.outage(None, self._endpoint())
            return out

    def _endpoint(self) -> str:
        return getattr(self, "endpoint_url", None) or "S3"
