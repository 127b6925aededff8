-- Sliding window counter on ONE key: the count of the current fixed window plus the count of
-- the previous one weighted by how much of it still overlaps the sliding window.
-- KEYS[1]  state key: "<window index> <current count> <previous count>"
-- ARGV[1]  window_us   window length in microseconds (integer)
-- ARGV[2]  limit       requests allowed per window
-- ARGV[3]  cost        units this request takes (usually 1)
-- Returns {allowed 0|1, remaining, retry_after_us, reset_after_us}.
-- Allowed when previous * (window - elapsed) / window + current + cost <= limit.
if redis.replicate_commands then redis.replicate_commands() end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local index = math.floor(now / window)
local elapsed = now - index * window
local current, previous = 0, 0
local state = redis.call('GET', KEYS[1])
if state then
  local i, c, p = string.match(state, '^(%d+) (%d+) (%d+)$')
  if i then
    i, c, p = tonumber(i), tonumber(c), tonumber(p)
    if i == index then
      current, previous = c, p
    elseif i == index - 1 then
      previous = c
    end
  end
end

local weight = (window - elapsed) / window
local estimate = previous * weight + current
local reset = (window - elapsed) + (current > 0 and window or 0)

if estimate + cost <= limit then
  current = current + cost
  redis.call('SET', KEYS[1], string.format('%.0f %.0f %.0f', index, current, previous),
             'PX', math.ceil((2 * window - elapsed) / 1000) + 1)
  return {1, math.floor(limit - estimate - cost + 1e-9), 0, 2 * window - elapsed}
end

-- When would the same request fit? Within this window as the previous count fades, or in
-- the next window as this window's count fades.
local retry
local room = limit - current - cost
if room >= 0 and previous > 0 then
  retry = window * (1 - room / previous) - elapsed
elseif cost <= limit and current > 0 then
  retry = (window - elapsed) + math.max(0, window * (1 - (limit - cost) / current))
else
  retry = (window - elapsed)
end
if retry < 1 then retry = 1 end
local remaining = math.floor(limit - estimate + 1e-9)
if remaining < 0 then remaining = 0 end
return {0, remaining, math.ceil(retry), math.ceil(reset)}
