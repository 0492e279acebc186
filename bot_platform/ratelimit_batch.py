"""Reservations of one process that arrive in the same event-loop moment share one Redis
script call: at ~400 sends/s with tens in flight, one call per send cost the web more CPU
(client encode, pool get/release, parse) than the rest of the send. Each request is still
checked and taken in order inside one script, atomic as a single call is, against Redis's
clock; each caller gets its own wait, and a failed call fails every caller in it, as a
single call's failure did."""

from __future__ import annotations

import asyncio
from typing import Any

# One request is 3 keys (bot bucket, chat bucket, bot pause) and 5 args (bot rate, bot
# capacity, chat rate, chat capacity, max_wait); a rate of 0 means "no such limit". The
# per-request body is the single-request script's, run for each in turn with one TIME.
RESERVE_MANY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for r = 0, #KEYS / 3 - 1 do
  local k, a = r * 3, r * 5
  local max_wait = tonumber(ARGV[a + 5])
  local delay = 0
  local paused = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
  if paused > now then delay = paused - now end
  local rates = {tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3])}
  local capacities = {tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])}
  local tokens = {}
  for i = 1, 2 do
    if rates[i] > 0 then
      local state = redis.call('HMGET', KEYS[k + i], 'tokens', 'ts')
      local level = tonumber(state[1]) or capacities[i]
      local since = tonumber(state[2]) or now
      level = math.min(capacities[i], level + math.max(0, now - since) * rates[i])
      tokens[i] = level
      if level < 1 then delay = math.max(delay, (1 - level) / rates[i]) end
    end
  end
  if delay <= max_wait then
    for i = 1, 2 do
      if rates[i] > 0 then
        local level = tokens[i] - 1
        redis.call('HSET', KEYS[k + i], 'tokens', tostring(level), 'ts', tostring(now))
        local ttl = math.ceil(((capacities[i] - level) / rates[i] + 5) * 1000)
        redis.call('PEXPIRE', KEYS[k + i], ttl)
      end
    end
  end
  out[r + 1] = tostring(delay)
end
return out
"""

# A batch bigger than this is split: one script blocks Redis for every other client.
MAX_BATCH = 256


class ReserveBatcher:
    """Collects reservations until the loop's next iteration, then sends them as one
    call of ``RESERVE_MANY``; several batches may be in flight at once."""

    def __init__(self, script: Any) -> None:
        self._script = script  # ``redis.register_script(RESERVE_MANY)``
        self._keys: list[str] = []
        self._args: list[float] = []
        self._futures: list[asyncio.Future[float]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def reserve(self, keys: list[str], args: list[float]) -> float:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[float] = loop.create_future()
        if not self._futures:
            loop.call_soon(self._flush)
        self._keys.extend(keys)
        self._args.extend(args)
        self._futures.append(future)
        if len(self._futures) >= MAX_BATCH:
            self._flush()
        return await future

    def _flush(self) -> None:
        if not self._futures:  # flushed early for being full
            return
        keys, args, futures = self._keys, self._args, self._futures
        self._keys, self._args, self._futures = [], [], []
        task = asyncio.get_running_loop().create_task(self._call(keys, args, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, keys: list[str], args: list[float],
                    futures: list[asyncio.Future[float]]) -> None:
        try:
            delays = await self._script(keys=keys, args=args)
        except BaseException as error:
            for future in futures:
                if not future.done():
                    future.set_exception(error if isinstance(error, Exception)
                                         else ConnectionError(repr(error)))
            if not isinstance(error, Exception):
                raise
            return
        for future, delay in zip(futures, delays, strict=True):
            if not future.done():
                future.set_result(float(delay))
