-- Quota: a counter per key and calendar period (the period is part of the key), on ONE key.
-- KEYS[1]  counter key of this period
-- ARGV[1]  limit        requests allowed in the period
-- ARGV[2]  cost         units this request takes
-- ARGV[3]  expire_at_ms when the counter may be dropped (period end plus a grace)
-- Returns {allowed 0|1, remaining}.
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
if used + cost <= limit then
  used = redis.call('INCRBY', KEYS[1], cost)
  if used == cost then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
  return {1, limit - used}
end
local remaining = limit - used
if remaining < 0 then remaining = 0 end
return {0, remaining}
