-- GCRA (generic cell rate algorithm) with token-bucket semantics, on ONE key.
-- KEYS[1]  state key: "<base_us> <n>" meaning TAT = base_us + n * interval_us
--          (TAT = theoretical arrival time; base is an integer so the arithmetic stays exact)
-- ARGV[1]  interval_us  emission interval T = window / limit, in microseconds (float)
-- ARGV[2]  burst        requests allowed at once from a fresh key
-- ARGV[3]  cost         units this request takes (usually 1)
-- Returns {allowed 0|1, remaining, retry_after_us, reset_after_us}.
-- A request is allowed when TAT' - now <= burst * T, where TAT' = max(TAT, now) + cost * T.
if redis.replicate_commands then redis.replicate_commands() end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local capacity = burst * interval

local base, n = now, 0
local state = redis.call('GET', KEYS[1])
if state then
  local b, k = string.match(state, '^(%d+) (%d+)$')
  if b then
    base, n = tonumber(b), tonumber(k)
  end
end

local ahead = (base - now) + n * interval  -- TAT - now
if ahead < 0 then
  base, n, ahead = now, 0, 0
end

local after = ahead + cost * interval
if after <= capacity then
  n = n + cost
  local ttl_ms = math.ceil(after / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%.0f %.0f', base, n), 'PX', ttl_ms)
  local remaining = math.floor((capacity - after) / interval + 1e-9)
  return {1, remaining, 0, math.ceil(after)}
end

local remaining = math.floor((capacity - ahead) / interval + 1e-9)
if remaining < 0 then remaining = 0 end
return {0, remaining, math.ceil(after - capacity), math.ceil(ahead)}
