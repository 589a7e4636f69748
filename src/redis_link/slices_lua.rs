//! The Lua every script uses to read a hash of slices — window leases
//! (`redis_link::lease`) and credit slices (`redis_link::credit_lease`) — and to
//! count what the slices may still spend. One text, prepended to each script
//! that reads such a hash (the leases themselves, the credits take in
//! `grants::redis_consume`, reservations in `holds::shared`), so the scripts
//! cannot disagree on the fields or on what an expired slice still holds.

/// Defines, for the scripts it is prepended to:
///
/// - `read_slices(key)`: the hash as a table: `t` (the total), `gv` (the
///   grants' version), `vf` (a void in progress until), and per instance id
///   `parts` (`i:`, its usage), `caps` (`c:`, its slice), `exps` (`x:`, when the
///   slice expires, Redis time) and `unrep` (`u:`, what its holder may use
///   without reporting);
/// - `unused(s, id, now)`: what instance `id`'s slice may still spend: all of
///   its unused part while it lives, once expired only what its holder may
///   have used without reporting;
/// - `slices_left(s, now)`: `unused` summed over every slice;
/// - `raise_own(s, key, me, v)`: raises instance `me`'s usage in the hash to
///   `v` (never lowers it), and the total with it; returns the total and
///   `me`'s usage. `s.parts` keeps the value read;
/// - `redis_now_ms()`: Redis' clock in milliseconds (slices expire by it);
/// - `recovering(ttl)`: whether the server started less than two ttls ago, so
///   slices granted before a restart that lost them may still be in use.
pub const SLICES_LUA: &str = r"
local function redis_now_ms()
  local tm = redis.call('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end
local function recovering(ttl)
  local info = redis.call('INFO', 'server')
  local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)') or '0')
  return up * 1000 < 2 * ttl
end
local function read_slices(key)
  local h = redis.call('HGETALL', key)
  local s = {t = 0, gv = 0, vf = 0, parts = {}, caps = {}, exps = {}, unrep = {}}
  for j = 1, #h, 2 do
    local f, val = h[j], h[j + 1]
    local p, id = string.sub(f, 1, 2), string.sub(f, 3)
    if f == 't' then s.t = tonumber(val)
    elseif f == 'gv' then s.gv = tonumber(val)
    elseif f == 'vf' then s.vf = tonumber(val)
    elseif p == 'i:' then s.parts[id] = tonumber(val)
    elseif p == 'c:' then s.caps[id] = tonumber(val)
    elseif p == 'x:' then s.exps[id] = tonumber(val)
    elseif p == 'u:' then s.unrep[id] = tonumber(val) end
  end
  return s
end
local function unused(s, id, now)
  local r = (s.caps[id] or 0) - (s.parts[id] or 0)
  if r < 0 then r = 0 end
  if (s.exps[id] or 0) <= now and (s.unrep[id] or 0) < r then r = s.unrep[id] or 0 end
  return r
end
local function raise_own(s, key, me, v)
  local mine = s.parts[me] or 0
  if v > mine then
    redis.call('HSET', key, 'i:' .. me, v)
    s.t = redis.call('HINCRBY', key, 't', v - mine)
    mine = v
  end
  return s.t, mine
end
local function slices_left(s, now)
  local sum = 0
  for id, _ in pairs(s.caps) do sum = sum + unused(s, id, now) end
  return sum
end
";
