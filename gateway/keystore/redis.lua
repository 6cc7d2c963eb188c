#!lua flags=allow-oom
-- The key registry's every operation on Redis, run atomically by the server (see redis.py for the layout).
--
-- ARGV[1] is the key prefix, ARGV[2] the operation; the rest depends on it. Every operation first drops the
-- records whose time to live has run out (by Redis's clock, read with TIME), and returns them so that the
-- calling replica tells its listeners. Times are integer milliseconds: Lua formats numbers with 14
-- significant digits, which holds a millisecond clock exactly and a microsecond one not.
-- Keys are built from ARGV rather than passed in KEYS: the store runs on one Redis, not a cluster.
-- allow-oom (the flags line above, Redis 7.0 or later): a Redis at its maxmemory still runs the script, whose
-- writes are index entries of a few hundred bytes, so that gets, touches, deletions and expiries keep working
-- there; only the upload of new key bytes (a plain HSET, outside the script) is refused.

local P = ARGV[1]
local OP = ARGV[2]
local META, USED, EXPIRY, TENANTS, SEQ = P .. 'meta', P .. 'used', P .. 'expiry', P .. 'tenants', P .. 'seq'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(member)
  local at = string.find(member, ':', 1, true) -- key ids hold no ':', tenants may
  return string.sub(member, 1, at - 1), string.sub(member, at + 1)
end

local function tenant_key(tenant) return P .. 'tenant:' .. tenant end
local function refs_key(key_id) return P .. 'refs:' .. key_id end
local function blob_key(key_id) return P .. 'blob:' .. key_id end

-- Redis expiry of one key set's bytes: the latest expiry of the records that share them.
local function refresh_blob(key_id)
  local top = redis.call('ZRANGE', refs_key(key_id), -1, -1, 'WITHSCORES')
  if #top == 0 then
    redis.call('DEL', blob_key(key_id))
  elseif top[2] == 'inf' then
    redis.call('PERSIST', blob_key(key_id))
    redis.call('PERSIST', refs_key(key_id))
  else
    redis.call('PEXPIREAT', blob_key(key_id), top[2])
    redis.call('PEXPIREAT', refs_key(key_id), top[2])
  end
end

-- The index lives and dies as one unit, so that it stays consistent (every member of EXPIRY has its META
-- entry and its bytes counted in TENANTS): an hour after its latest record expires. Until then a replica
-- that was down or busy still finds the expired entries and tells its listeners; the bytes, which are what
-- weighs, expire on time (refresh_blob). A tenant's order goes an hour after that tenant's latest record.
local INDEX_GRACE_MS = 3600000
local function expire_at(key, score)
  if score == 'inf' then
    redis.call('PERSIST', key)
  else
    redis.call('PEXPIREAT', key, tonumber(score) + INDEX_GRACE_MS)
  end
end

local function refresh_index()
  local top = redis.call('ZRANGE', EXPIRY, -1, -1, 'WITHSCORES')
  if #top == 0 then
    redis.call('DEL', SEQ)
    return
  end
  for _, key in ipairs({ META, USED, EXPIRY, TENANTS, SEQ }) do
    expire_at(key, top[2])
  end
end

local function refresh_tenant(tenant) -- its sets are at most tenant_key_sets
  local members = {}
  for i, key_id in ipairs(redis.call('ZRANGE', tenant_key(tenant), 0, -1)) do
    members[i] = key_id .. ':' .. tenant
  end
  if #members == 0 then
    return
  end
  local latest = nil
  for _, score in ipairs(redis.call('ZMSCORE', EXPIRY, unpack(members))) do
    if score == 'inf' or (latest ~= 'inf' and (not latest or tonumber(score) > tonumber(latest))) then
      latest = score
    end
  end
  expire_at(tenant_key(tenant), latest)
end

-- Remove one record from the index (its bytes go with its last record); returns its entry (JSON).
local function remove(member)
  local key_id, tenant = split(member)
  local entry = redis.call('HGET', META, member)
  redis.call('HDEL', META, member)
  redis.call('ZREM', USED, member)
  redis.call('ZREM', EXPIRY, member)
  redis.call('ZREM', tenant_key(tenant), key_id)
  if entry then
    redis.call('HINCRBY', TENANTS, tenant, 0 - cjson.decode(entry).resident_bytes) -- never '-0'
  end
  if redis.call('EXISTS', tenant_key(tenant)) == 0 then
    redis.call('HDEL', TENANTS, tenant)
  end
  redis.call('ZREM', refs_key(key_id), tenant)
  refresh_blob(key_id)
  return entry
end

local function sweep(now)
  local dropped = {}
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now)) do
    local entry = remove(member)
    if entry then
      dropped[#dropped + 1] = entry
    end
  end
  if #dropped > 0 then
    refresh_index()
  end
  return dropped
end

local function expiry(now, ttl_ms)
  if ttl_ms < 0 then
    return 'inf'
  end
  return now + ttl_ms
end

-- Write one record's entry and its place in every order; the caller refreshes the expiries.
local function place(member, entry, expires_at)
  local key_id, tenant = split(member)
  local seq = redis.call('INCR', SEQ)
  redis.call('HSET', META, member, cjson.encode(entry))
  redis.call('ZADD', USED, seq, member)
  redis.call('ZADD', EXPIRY, expires_at, member)
  redis.call('ZADD', tenant_key(tenant), seq, key_id)
  redis.call('ZADD', refs_key(key_id), expires_at, tenant)
end

local function touch(member, now, ttl_ms)
  local entry = cjson.decode(redis.call('HGET', META, member))
  entry.last_used_at = now
  place(member, entry, expiry(now, ttl_ms))
  refresh_blob(entry.key_id)
  refresh_tenant(entry.tenant)
  refresh_index()
  return cjson.encode(entry)
end

-- The eviction plan of one admission (see KeyLimits): nothing changes unless it is admitted.
local function plan(tenant, size, budget, tenant_bytes, tenant_sets)
  local held, count, lru, cursor = {}, {}, {}, {}
  local flat = redis.call('HGETALL', TENANTS)
  for i = 1, #flat, 2 do
    held[flat[i]] = tonumber(flat[i + 1])
  end
  held[tenant] = held[tenant] or 0
  local function load(t) -- each tenant's sets, least recently used first, read once
    if not lru[t] then
      lru[t] = redis.call('ZRANGE', tenant_key(t), 0, -1, 'WITHSCORES')
      count[t] = #lru[t] / 2
      cursor[t] = 1
    end
  end
  local victims = {}
  local function evict(t)
    local key_id = lru[t][2 * cursor[t] - 1]
    cursor[t] = cursor[t] + 1
    local member = key_id .. ':' .. t
    held[t] = held[t] - cjson.decode(redis.call('HGET', META, member)).resident_bytes
    count[t] = count[t] - 1
    victims[#victims + 1] = member
  end
  load(tenant)
  while held[tenant] + size > tenant_bytes or count[tenant] + 1 > tenant_sets do
    evict(tenant)
  end
  while true do
    local total, holders = 0, 0
    for t, bytes in pairs(held) do
      load(t)
      total = total + bytes
      if count[t] > 0 or t == tenant then
        holders = holders + 1
      end
    end
    if total + size <= budget then
      return victims, nil
    end
    -- The newcomer's tenant is weighed with the newcomer: at its share, it replaces its own sets.
    local share = budget / holders
    local largest, most, oldest = nil, 0, nil
    for t, bytes in pairs(held) do
      if count[t] > 0 then
        local weight = bytes + (t == tenant and size or 0)
        local next_used = tonumber(lru[t][2 * cursor[t]])
        if not largest or weight > most or (weight == most and next_used < oldest) then
          largest, most, oldest = t, weight, next_used
        end
      end
    end
    if not largest or most <= share then
      return nil, { total, holders, most }
    end
    evict(largest)
  end
end

local now = now_ms()
local dropped = sweep(now)

if OP == 'put' then
  -- ARGV: tenant, key_id, entry JSON (times unset), ttl_ms (-1: never), budget, tenant_bytes, tenant_sets, stage key
  local tenant, key_id, ttl_ms = ARGV[3], ARGV[4], tonumber(ARGV[6])
  local stage = ARGV[10]
  local member = key_id .. ':' .. tenant
  if redis.call('HEXISTS', META, member) == 1 then
    if stage ~= '' then
      redis.call('DEL', stage)
    end
    return { 'ok', dropped, touch(member, now, ttl_ms), {} }
  end
  local blob_present = redis.call('EXISTS', blob_key(key_id)) == 1
  if not blob_present and (stage == '' or redis.call('EXISTS', stage) == 0) then
    return { 'need_bytes', dropped }
  end
  local entry = cjson.decode(ARGV[5])
  local victims, refusal = plan(tenant, entry.resident_bytes, tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]))
  if not victims then
    if stage ~= '' then
      redis.call('DEL', stage)
    end
    return { 'full', dropped, refusal }
  end
  local evicted = {}
  for _, victim in ipairs(victims) do
    evicted[#evicted + 1] = remove(victim)
  end
  if stage ~= '' then
    if blob_present then
      redis.call('DEL', stage)
    else
      redis.call('RENAME', stage, blob_key(key_id))
    end
  end
  entry.created_at, entry.last_used_at = now, now
  place(member, entry, expiry(now, ttl_ms))
  redis.call('HINCRBY', TENANTS, tenant, entry.resident_bytes)
  refresh_blob(key_id)
  refresh_tenant(tenant)
  refresh_index()
  return { 'ok', dropped, cjson.encode(entry), evicted }
elseif OP == 'touch' then
  -- ARGV: tenant, key_id, ttl_ms
  local member = ARGV[4] .. ':' .. ARGV[3]
  if redis.call('HEXISTS', META, member) == 0 then
    return { 'missing', dropped }
  end
  return { 'ok', dropped, touch(member, now, tonumber(ARGV[5])) }
elseif OP == 'delete' or OP == 'lost' then
  -- ARGV: tenant, key_id. 'lost': only if the bytes are gone (Redis evicted them: maxmemory-policy).
  local member = ARGV[4] .. ':' .. ARGV[3]
  if redis.call('HEXISTS', META, member) == 0 then
    return { 'missing', dropped }
  end
  if OP == 'lost' and redis.call('EXISTS', blob_key(ARGV[4])) == 1 then
    return { 'present', dropped }
  end
  local entry = remove(member)
  refresh_index()
  return { 'ok', dropped, entry }
elseif OP == 'entries' then
  -- ARGV: 'all' or 'tenant', the tenant
  local members
  if ARGV[3] == 'all' then
    members = redis.call('ZRANGE', USED, 0, -1)
  else
    members = {}
    for _, key_id in ipairs(redis.call('ZRANGE', tenant_key(ARGV[4]), 0, -1)) do
      members[#members + 1] = key_id .. ':' .. ARGV[4]
    end
  end
  local entries = {}
  for i, member in ipairs(members) do
    entries[i] = redis.call('HGET', META, member)
  end
  return { 'ok', dropped, entries }
elseif OP == 'resident' then
  -- ARGV: 'all' or 'tenant', the tenant
  local total = 0
  if ARGV[3] == 'all' then
    for _, bytes in ipairs(redis.call('HVALS', TENANTS)) do
      total = total + tonumber(bytes)
    end
  else
    total = tonumber(redis.call('HGET', TENANTS, ARGV[4]) or '0')
  end
  return { 'ok', dropped, tostring(total) }
elseif OP == 'expire' then
  return { 'ok', dropped }
end
return redis.error_reply('unknown key store operation ' .. tostring(OP))
