-- fga-wb's Redis store: one library of functions, loaded as one script and
-- dispatched on ARGV[1], so every change to a store's keys is atomic.
--
-- KEYS[1] is the store's prefix, e.g. "fga-wb:{01J...}"; every key below
-- starts with it (the braces keep a store's keys in one cluster slot).
--
--   P:seq            string  last sequence number
--   P:ops            hash    tuple key -> "seq|first|since_ms|op|state|cond"
--                            op: g(rant) r(evoke); state: r(eady) t(aken)
--   P:ready:g|r      zset    ready tuple keys, scored by `first`
--   P:leases         zset    taken tuple keys -> lease end (ms)
--   P:counts         hash    rg, rr (ready grants / revokes), t (taken)
--   P:rel            hash    "type#rel|g" / "type#rel|r" -> latest ops by kind
--   P:lex:type#rel|g|r zset  tuple keys by the kind of their latest op, all
--                            score 0, so one object's keys are one lex range
--   P:locks          hash    tuple key -> "owner|seq|until_ms" while being written
--   P:dead           hash    id -> dead letter (JSON); P:deadseq its counter
--   P:stats          hash    totals
--   P:gen            hash    "type#rel" -> ops acknowledged or dead-lettered on
--                            it, "*" -> on any: cached answers compare these
--   P:events         channel relation names whose checks may have changed
--
-- A corrupt entry (not written by this script) is treated as absent and
-- reported in the result, so the caller can log it; it never raises.

local P = KEYS[1]
local cmd = ARGV[1]

local function parse(v)
  if not v then return nil end
  local seq, first, since, op, state, cond =
    string.match(v, '^(%d+)|(%d+)|(%d+)|([gr])|([rt])|(.*)$')
  if not seq then return nil end
  return { seq = tonumber(seq), first = tonumber(first), since = tonumber(since),
           op = op, state = state, cond = cond }
end

local function encode(e)
  return e.seq .. '|' .. e.first .. '|' .. e.since .. '|' .. e.op .. '|' .. e.state .. '|' .. e.cond
end

-- HINCRBY that repairs a counter holding something that is not a number
-- (counters are bookkeeping; a failed HINCRBY would abort the script after
-- earlier writes, which Redis does not undo).
-- Counter changes are summed in Lua and written once per command
-- (flush_incrs), which matters when one push carries hundreds of ops.
local deltas, delta_order = {}, {}
local function incr(hash, field, d)
  local k = hash .. '\0' .. field
  if deltas[k] == nil then
    deltas[k] = 0
    table.insert(delta_order, { hash, field, k })
  end
  deltas[k] = deltas[k] + d
end

local function flush_incrs()
  for _, hf in ipairs(delta_order) do
    local hash, field, d = hf[1], hf[2], deltas[hf[3]]
    if d ~= 0 then
      local r = redis.pcall('HINCRBY', hash, field, d)
      if type(r) == 'table' and r.err then
        redis.call('HSET', hash, field, 0)
        redis.call('HINCRBY', hash, field, d)
      end
    end
  end
  deltas, delta_order = {}, {}
end

-- Refuses to run (before writing anything) when a key holds another type
-- than fga-wb writes there: someone else's data under our prefix.
local function expect_types(list)
  for _, kt in ipairs(list) do
    local t = redis.call('TYPE', kt[1])['ok']
    if t ~= 'none' and t ~= kt[2] then
      return 'fga-wb: Redis key ' .. kt[1] .. ' holds a ' .. t .. ', expected a ' .. kt[2] ..
        '; it was not written by fga-wb (remove it, or use another redis.key_prefix)'
    end
  end
  local seq = redis.call('GET', P .. ':seq')
  if redis.call('TYPE', P .. ':seq')['ok'] == 'string' and not tonumber(seq) then
    return 'fga-wb: Redis key ' .. P .. ':seq holds ' .. string.sub(seq, 1, 40) ..
      ', expected a number; it was not written by fga-wb'
  end
  return nil
end

local base_types = {
  { P .. ':ops', 'hash' }, { P .. ':ready:g', 'zset' }, { P .. ':ready:r', 'zset' },
  { P .. ':leases', 'zset' }, { P .. ':counts', 'hash' }, { P .. ':rel', 'hash' },
  { P .. ':stats', 'hash' }, { P .. ':gen', 'hash' }, { P .. ':locks', 'hash' },
  { P .. ':dead', 'hash' }, { P .. ':seq', 'string' }, { P .. ':deadseq', 'string' },
}

local function check_keys(keys)
  local list = {}
  for _, kt in ipairs(base_types) do table.insert(list, kt) end
  local seen = {}
  for _, key in ipairs(keys) do
    local object, relation = string.match(key, '^([^#]*)#([^@]*)@')
    if object then
      local rel = (string.match(object, '^([^:]*):') or object) .. '#' .. relation
      if not seen[rel] then
        seen[rel] = true
        table.insert(list, { P .. ':lex:' .. rel .. '|g', 'zset' })
        table.insert(list, { P .. ':lex:' .. rel .. '|r', 'zset' })
      end
    end
  end
  return expect_types(list)
end

local function rel_of(key)
  -- "type:id#relation@user" -> "type#relation"
  local object, relation = string.match(key, '^([^#]*)#([^@]*)@')
  if not object then return nil end
  local ty = string.match(object, '^([^:]*):') or object
  return ty .. '#' .. relation
end

-- Adjusts the per-relation counts for the latest op `op` on `key` by `d`.
local function count_latest(key, op, d)
  local rel = rel_of(key)
  if not rel then return end
  incr(P .. ':rel', rel .. '|' .. op, d)
  if d > 0 then
    redis.call('ZADD', P .. ':lex:' .. rel .. '|' .. op, 0, key)
  else
    redis.call('ZREM', P .. ':lex:' .. rel .. '|' .. op, key)
  end
end

local function unready(key, e)
  redis.call('ZREM', P .. ':ready:' .. e.op, key)
  incr(P .. ':counts', 'r' .. e.op, -1)
end

local function ready(key, e)
  e.state = 'r'
  redis.call('HSET', P .. ':ops', key, encode(e))
  redis.call('ZADD', P .. ':ready:' .. e.op, e.first, key)
  incr(P .. ':counts', 'r' .. e.op, 1)
end

local function untake(key)
  redis.call('ZREM', P .. ':leases', key)
  incr(P .. ':counts', 't', -1)
end

-- Removes an entry for good (applied or dead-lettered).
local function drop(key, e)
  redis.call('HDEL', P .. ':ops', key)
  if e.state == 'r' then unready(key, e) else untake(key) end
  count_latest(key, e.op, -1)
end

-- Ops whose taker died before finishing them (lease over) are ready again.
local function reclaim(now)
  local expired = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now, 'LIMIT', 0, 1000)
  for _, key in ipairs(expired) do
    local e = parse(redis.call('HGET', P .. ':ops', key))
    untake(key)
    if e and e.state == 't' then ready(key, e) end
  end
end

-- push now cap n (key op cond)*n -> {seq, coalesced}*n .. {pending, corrupt}
-- seq is -1 for an op refused because the buffer is full.
if cmd == 'push' then
  local now, cap, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local keys = {}
  for i = 0, n - 1 do table.insert(keys, ARGV[5 + i * 3]) end
  local bad = check_keys(keys)
  if bad then return redis.error_reply(bad) end
  local out, rels, corrupt = {}, {}, 0
  local acked, coalesced_total = 0, 0
  local size = redis.call('HLEN', P .. ':ops')
  -- One INCRBY for the batch; an op refused for capacity leaves a gap.
  local last = redis.call('INCRBY', P .. ':seq', n)
  for i = 0, n - 1 do
    local key, op, cond = ARGV[5 + i * 3], ARGV[6 + i * 3], ARGV[7 + i * 3]
    local raw = redis.call('HGET', P .. ':ops', key)
    local cur = parse(raw)
    if raw and not cur then
      corrupt = corrupt + 1
      redis.call('HDEL', P .. ':ops', key)
      size = size - 1
    end
    if not cur and size >= cap then
      table.insert(out, -1)
      table.insert(out, 0)
    else
      if not cur then size = size + 1 end
      local seq = last - n + 1 + i
      local first, since, coalesced = seq, now, 0
      if cur then
        count_latest(key, cur.op, -1)
        if cur.state == 'r' then
          -- Folded into this op: it keeps its place in the queue.
          unready(key, cur)
          first, since, coalesced = cur.first, cur.since, 1
        else
          -- Being written: that write is accounted when it finishes.
          untake(key)
        end
      end
      local e = { seq = seq, first = first, since = since, op = op, state = 'r', cond = cond }
      ready(key, e)
      count_latest(key, op, 1)
      local rel = rel_of(key)
      if rel then rels[rel] = true end
      acked = acked + 1
      coalesced_total = coalesced_total + coalesced
      table.insert(out, seq)
      table.insert(out, coalesced)
    end
  end
  if acked > 0 then
    incr(P .. ':stats', 'acknowledged', acked)
  end
  if coalesced_total > 0 then
    incr(P .. ':stats', 'coalesced', coalesced_total)
  end
  for rel, _ in pairs(rels) do
    incr(P .. ':gen', rel, 1)
    redis.call('PUBLISH', P .. ':events', 'op ' .. rel)
  end
  if acked > 0 then incr(P .. ':gen', '*', 1) end
  flush_incrs()
  local c = redis.call('HMGET', P .. ':counts', 'rg', 'rr')
  table.insert(out, (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0))
  table.insert(out, corrupt)
  flush_incrs()
  return out
end

-- take now max kinds up_to lease_ms -> {corrupt, (key, seq, op, cond, first)*}
if cmd == 'take' then
  local now, max, kinds, up_to, lease =
    tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local bad = check_keys({})
  if bad then return redis.error_reply(bad) end
  reclaim(now)
  -- First item: how many unreadable entries were dropped from the queues.
  local out = { 0 }
  for i = 1, #kinds do
    local kind = string.sub(kinds, i, i)
    local room = max - (#out - 1) / 5
    if room <= 0 then break end
    local keys = redis.call('ZRANGEBYSCORE', P .. ':ready:' .. kind, '-inf', up_to, 'LIMIT', 0, room)
    for _, key in ipairs(keys) do
      local e = parse(redis.call('HGET', P .. ':ops', key))
      redis.call('ZREM', P .. ':ready:' .. kind, key)
      incr(P .. ':counts', 'r' .. kind, -1)
      if not e then
        out[1] = out[1] + 1
      end
      if e and e.state == 'r' then
        e.state = 't'
        redis.call('HSET', P .. ':ops', key, encode(e))
        redis.call('ZADD', P .. ':leases', now + lease, key)
        incr(P .. ':counts', 't', 1)
        table.insert(out, key)
        table.insert(out, e.seq)
        table.insert(out, e.op)
        table.insert(out, e.cond)
        table.insert(out, e.first)
      end
    end
  end
  flush_incrs()
  return out
end

-- claim now owner ttl_ms n (key seq)*n -> {status}* : 1 claimed, 0 stale, 2 busy
-- A key is written by one taker at a time, and only for its newest op.
if cmd == 'claim' then
  local now, owner, ttl, n = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local bad = expect_types({ { P .. ':ops', 'hash' }, { P .. ':locks', 'hash' } })
  if bad then return redis.error_reply(bad) end
  local out = {}
  for i = 0, n - 1 do
    local key, seq = ARGV[6 + i * 2], tonumber(ARGV[7 + i * 2])
    local e = parse(redis.call('HGET', P .. ':ops', key))
    local lock = redis.call('HGET', P .. ':locks', key)
    local holder, lseq, untilms = nil, nil, 0
    if lock then
      holder, lseq, untilms = string.match(lock, '^(.*)|(%d+)|(%d+)$')
      lseq = tonumber(lseq)
      untilms = tonumber(untilms) or 0
    end
    if not e or e.seq ~= seq then
      table.insert(out, 0)
    elseif holder and (holder ~= owner or lseq ~= seq) and untilms > now then
      -- Another writer, or another job of this one (a worker runs several
      -- at once under one owner), is writing this key.
      table.insert(out, 2)
    else
      redis.call('HSET', P .. ':locks', key, owner .. '|' .. seq .. '|' .. (now + ttl))
      table.insert(out, 1)
    end
  end
  flush_incrs()
  return out
end

-- finish now owner n (key seq outcome arg code attempts op)*n
--   outcome: a(pplied) d(ead) r(equeue) k(eep taken; arg = lease ms)
--   -> {applied, dead, requeued, superseded}
if cmd == 'finish' then
  local now, owner, n = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
  local keys = {}
  for i = 0, n - 1 do table.insert(keys, ARGV[5 + i * 7]) end
  local bad = check_keys(keys)
  if bad then return redis.error_reply(bad) end
  local applied, dead, requeued, superseded = 0, 0, 0, 0
  local rels = {}
  for i = 0, n - 1 do
    local b = 5 + i * 7
    local key, seq, outcome = ARGV[b], tonumber(ARGV[b + 1]), ARGV[b + 2]
    local arg, code, attempts, op = ARGV[b + 3], ARGV[b + 4], tonumber(ARGV[b + 5]), ARGV[b + 6]
    local e = parse(redis.call('HGET', P .. ':ops', key))
    local same = e and e.seq == seq and e.state == 't'
    if outcome == 'k' then
      -- Still owned (by a job): only the lease changes; counted when done.
      if same then
        redis.call('ZADD', P .. ':leases', now + (tonumber(arg) or 0), key)
      end
    elseif outcome == 'a' then
      applied = applied + 1
      if same then drop(key, e) end
    elseif not same then
      -- A newer op replaced it while it was being written: that one counts.
      superseded = superseded + 1
    elseif outcome == 'd' then
      dead = dead + 1
      drop(key, e)
      local id = redis.call('INCR', P .. ':deadseq')
      redis.call('HSET', P .. ':dead', id, cjson.encode({
        id = id, key = key, op = e.op, seq = e.seq, reason = arg, code = code,
        attempts = attempts, dead_at = math.floor(now / 1000), cond = e.cond }))
      local rel = rel_of(key)
      if rel then rels[rel] = true end
    elseif outcome == 'r' then
      requeued = requeued + 1
      untake(key)
      ready(key, e)
    end
    -- Not being written any more, whatever the outcome.
    local lock = redis.call('HGET', P .. ':locks', key)
    local mine = owner .. '|' .. seq .. '|'
    if lock and string.sub(lock, 1, #mine) == mine then
      redis.call('HDEL', P .. ':locks', key)
    end
  end
  if applied > 0 then incr(P .. ':stats', 'applied', applied) end
  if dead > 0 then incr(P .. ':stats', 'dead_lettered', dead) end
  if superseded > 0 then incr(P .. ':stats', 'coalesced', superseded) end
  for rel, _ in pairs(rels) do
    incr(P .. ':gen', rel, 1)
    incr(P .. ':gen', '*', 1)
    redis.call('PUBLISH', P .. ':events', 'op ' .. rel)
  end
  redis.call('PUBLISH', P .. ':events', 'finished')
  flush_incrs()
  return { applied, dead, requeued, superseded }
end

-- relevant limit object nrels (rel same)* -> {revokes, grants, (key, cond)*}
-- same = 1: only ops on `object` count. No list when there are revokes or
-- more grants than limit. nrels = 0: every relation, every object.
if cmd == 'relevant' then
  local limit, object, nrels = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
  local rels = {}
  if nrels == 0 then
    local seen = {}
    for _, f in ipairs(redis.call('HKEYS', P .. ':rel')) do
      local rel = string.match(f, '^(.*)|[gr]$')
      if rel and not seen[rel] then
        seen[rel] = true
        table.insert(rels, { rel, false })
      end
    end
  else
    for i = 0, nrels - 1 do
      table.insert(rels, { ARGV[5 + i * 2], ARGV[6 + i * 2] == '1' })
    end
  end
  local lo, hi = '[' .. object .. '#', '[' .. object .. '#\255'
  local revokes, grants = 0, 0
  for _, r in ipairs(rels) do
    local rel, same = r[1], r[2]
    if same then
      grants = grants + redis.call('ZLEXCOUNT', P .. ':lex:' .. rel .. '|g', lo, hi)
      revokes = revokes + redis.call('ZLEXCOUNT', P .. ':lex:' .. rel .. '|r', lo, hi)
    else
      local c = redis.call('HMGET', P .. ':rel', rel .. '|g', rel .. '|r')
      grants = grants + math.max(tonumber(c[1]) or 0, 0)
      revokes = revokes + math.max(tonumber(c[2]) or 0, 0)
    end
  end
  local out = { revokes, grants }
  if revokes > 0 or grants > limit then return out end
  for _, r in ipairs(rels) do
    local rel, same = r[1], r[2]
    local keys
    if same then
      keys = redis.call('ZRANGEBYLEX', P .. ':lex:' .. rel .. '|g', lo, hi)
    else
      keys = redis.call('ZRANGE', P .. ':lex:' .. rel .. '|g', 0, -1)
    end
    for _, key in ipairs(keys) do
      local e = parse(redis.call('HGET', P .. ':ops', key))
      if e and e.op == 'g' then
        table.insert(out, key)
        table.insert(out, e.cond)
      end
    end
  end
  flush_incrs()
  return out
end

-- clear -> {key, op, cond}* : drops every ready op
if cmd == 'clear' then
  local bad = check_keys({})
  if bad then return redis.error_reply(bad) end
  local out = {}
  for _, kind in ipairs({ 'g', 'r' }) do
    for _, key in ipairs(redis.call('ZRANGE', P .. ':ready:' .. kind, 0, -1)) do
      local e = parse(redis.call('HGET', P .. ':ops', key))
      if e and e.state == 'r' then
        drop(key, e)
        table.insert(out, key)
        table.insert(out, e.op)
        table.insert(out, e.cond)
      else
        redis.call('ZREM', P .. ':ready:' .. kind, key)
      end
    end
  end
  redis.call('HSET', P .. ':counts', 'rg', 0, 'rr', 0)
  if #out > 0 then
    incr(P .. ':stats', 'cleared', #out / 3)
    for _, f in ipairs(redis.call('HKEYS', P .. ':gen')) do
      incr(P .. ':gen', f, 1)
    end
    incr(P .. ':gen', '*', 1)
  end
  redis.call('PUBLISH', P .. ':events', 'all')
  flush_incrs()
  return out
end

-- pending -> {rg, rr, t, oldest_since_ms or -1}
if cmd == 'pending' then
  -- ARGV[2]: now; reclaiming here lets an idle flusher notice ops whose
  -- taker died.
  if ARGV[2] and check_keys({}) == nil then reclaim(tonumber(ARGV[2])) end
  flush_incrs()
  local c = redis.call('HMGET', P .. ':counts', 'rg', 'rr', 't')
  local oldest = -1
  for _, kind in ipairs({ 'g', 'r' }) do
    local k = redis.call('ZRANGE', P .. ':ready:' .. kind, 0, 0)[1]
    if k then
      local e = parse(redis.call('HGET', P .. ':ops', k))
      if e and (oldest < 0 or e.since < oldest) then oldest = e.since end
    end
  end
  return { tonumber(c[1]) or 0, tonumber(c[2]) or 0, tonumber(c[3]) or 0, oldest }
end

return redis.error_reply('fga-wb: unknown command ' .. tostring(cmd))
