-- fga-wb's Redis store: one library of functions, loaded as one script and
-- dispatched on ARGV[1], so every change to a store's keys is atomic.
--
-- KEYS[1] is the store's prefix P, e.g. "fga-wb:{01J...}"; every key below
-- starts with it, so a store's keys share one Redis Cluster slot.
--
--   P:seq              string  last sequence number
--   P:ops              hash    tuple key -> entry (below)
--   P:ready:g|r        zset    keys whose op can be taken now, scored by `first`
--   P:lex:<type#rel>|g|r zset  keys by the kind of their latest op, all score 0,
--                              so one object's keys are one lex range
--   P:rel              hash    "type#rel|g|r" -> keys whose latest op is of that kind
--   P:counts           hash    pg, pr (pending grants, revokes), t (being written),
--                              j (held by jobs)
--   P:blocked          zset    keys in state b (below), scored by `first`
--   P:owners           zset    writer -> end of its lease (ms): processes and
--                              workers that heartbeat
--   P:terms            hash    writer -> its term, from P:termseq: new each time
--                              the writer renews and finds it had no lease
--                              (its first call, or reclaim handed what it
--                              held to others, and deleted its term); see
--                              renew
--   P:termseq          string  last term
--   P:holdfor          hash    writer -> its flush.unknown_outcome_hold (ms),
--                              set with its term: how long a Write of its
--                              may still land after it stopped waiting
--   P:heldover         hash    writer -> when its lease ended (ms), for a
--                              writer whose lease ended while it was writing:
--                              reclaim keeps what it holds for its hold past
--                              that (see reclaim), and it counts as gone
--   P:beats            hash    writer -> when it last ran a heartbeat (ms); kept
--                              10 min after its last (see confirmed), gone at
--                              a clean stop
--   P:acks             hash    writer -> how many ops its pushes had
--                              accepted, in all; recount:<writer> -> the
--                              number of the heartbeat that set it (or 1) while
--                              its count is to be counted again (see heartbeat)
--   P:owes             hash    tuple key -> seq of its latest op, a grant
--                              pushed over a revoke of the tuple not known
--                              to have reached OpenFGA (folded into it), or
--                              "seq|ifseq" when pushed while that revoke
--                              (op ifseq) was being written: owed unless
--                              that write lands. Should OpenFGA refuse the
--                              grant for good, the revoke is owed (see
--                              finish). A field whose seq is not the key's
--                              latest op's means nothing.
--   P:w:<writer>       set     keys the writer is writing (a process), or
--                              keys blocked behind its writes
--   P:wj:<writer>      set     jobs a worker is running
--   P:fin:<writer>     zset    call id -> "id|applied|dead|requeued|superseded[|repended]":
--                              the answers of the writer's finish calls it
--                              may still repeat (see finish); 10 min expiry
--   P:push:<writer>    zset    call id -> "id|" and the call's answer, comma
--                              separated: the answers of the writer's push
--                              calls a Redis Cluster client may still send
--                              again (see push); 10 min expiry
--   P:clearans:<writer> string the writer's last clear step's id and answer
--                              (see clear); 10 min expiry
--   P:lossacks         hash    "now by" of an ack of a loss -> its answer
--                              (see ackloss); 10 min expiry
--   P:jobs             hash    job id -> job (JSON)
--   P:jobc             hash    job id -> its ops' "key\nseq" lines, as
--                              enqueued (see enqueue); gone once rewritten
--   P:jobq             zset    job id -> when it may run (ms)
--   P:jobrun           hash    job id -> the worker running it
--   P:jk:<id>          set     keys a job holds
--   P:badjobs          hash    job id -> a job that could not be read (its ops
--                              were made pending again)
--   P:jobseq           string  last job id
--   P:dead             hash    id -> dead letter (JSON); P:deadseq its counter
--   P:deadkey          hash    tuple key -> id of its newest letter, until a
--                              newer op on the key is applied, or cleared
--                              (unless the letter is of a revoke that died
--                              of transient causes: see supersede_letters),
--                              which deletes the field (older versions set
--                              it to 0, which reads as none):
--                              a letter is replayable only while this names
--                              it and the key has no entry in P:ops
--   P:deadrev          zset    tuple keys whose newest letter is a revoke, or a
--                              grant with a condition, that died of transient
--                              causes, all score 0: OpenFGA may still hold
--                              what the revoke revokes, or a wider tuple the
--                              grant was to replace, so checks it can change
--                              fail closed while it is current (see relevant;
--                              entries are checked there, so one left behind
--                              only costs a look)
--   P:deadgr           zset    the same for plain grants: they leave a check
--                              in doubt only where a grant of their relation
--                              takes access away (under a `but not`)
--   P:deadrev:<type#rel>, P:deadgr:<type#rel>
--                      zset    the same, by relation, so one object's keys
--                              are one lex range
--   P:deadcur          zset    tuple keys whose newest letter died of transient
--                              causes, scored by its op's place in line
--                              (`first`): what `unfinished` looks at for
--                              letters a replay may still write
--   P:deadcur:v        string  how far the transient letters older versions
--                              wrote are indexed in P:deadcur: the last
--                              letter id looked at, then "done"
--   P:deadcur:end      string  where that walk ends when P:deadseq is far past
--                              it (a loss moved it 2^32 ahead): the highest
--                              letter id when the walk began
--   P:replayn          hash    tuple key -> "count|since|applied": the
--                              key's deaths after a worker's replays while
--                              other writes landed, within an hour (see
--                              replay); P:replayz, zset key -> since,
--                              forgets them after the hour
--   P:left             set     tuple keys whose letters a worker left for an
--                              operator (see replay, unfinished)
--   P:jobmin           zset    job id -> the lowest place in line (`first`) of
--                              the ops it held when queued: the jobs
--                              `unfinished` looks in (kept with P:jobs)
--   P:stats            hash    totals and notes (dead_transient: letters ever
--                              written that died of transient causes)
--   P:gen              hash    "type#rel" -> changes of its checks; "*" -> any
--   P:written          hash    "type#rel" -> when a write on it was last applied
--                              (ms, Redis's clock): OpenFGA's caches may not
--                              show it yet (see written.rs); "*" -> when the
--                              store's epoch began or a loss was acknowledged:
--                              the marks of writes before then may be gone,
--                              so every check counts it; "#objects" -> when
--                              P:wobj last lost marks for being full: every
--                              check on one object counts it
--   P:wobj             zset    "object#rel" -> the same per object, kept 2 min
--                              (at most WRITTEN_OBJECTS_MAX)
--   P:wprune           string  set (12 s) while P:written was lately looked
--                              over for old relations
--   P:epoch            string  the store's epoch: set when its keys are first
--                              written, and again after a loss (heartbeat)
--   P:epochs           hash    epochs replaced after a recorded loss -> when
--   P:loss             hash    an open loss record: at, by, reason, more
--   P:events           channel "op <type#rel>", "finished", "jobs", "all"
--   P:clearing         zset    "up_to|jobs_up_to" of each clear under way (its
--                              steps are separate calls) -> until when its next
--                              step is due (ms, Redis's clock): checks that
--                              send pending grants wait meanwhile (relevant)
--   P:clearskip        set     ids of jobs whose ops a clear's step kept
--                              because the job was running: its last step
--                              ends those a job still holds once it is not
--                              (10 min expiry; shared by clears at once)
--   P:roomwait         string  set (for 2 s) when a push found the buffer
--                              full: while it exists, every write that
--                              frees room says "finished"
--
-- An entry is "seq|first|since|op|state|job|writer|ifseq|cond", describing the
-- key's latest op:
--   state r  pending, ready to be taken
--         j  held by job `job`: while the job waits in the queue a newer op
--            supersedes it; while a worker runs it (P:jobrun) it is being
--            written, as in state t
--         t  being written by `writer` (a process)
--         b  pending, blocked: an older op of the key (seq `ifseq`) is being
--            written by `writer` (a process, or the worker running the job
--            that holds it); it becomes ready when that write ends
-- So no two writers ever write one key at once, and a newer op is never
-- overtaken by an older one.
--
-- Reads that find an entry they cannot parse (not written by fga-wb) treat it
-- as absent and report it, so the caller can log it; nothing raises on data.
-- Multi-key commands are issued once per call (HMGET, HSET, ZADD, ZREM with
-- many members): per-call overhead, not per-op work, dominates Lua's cost.

local P = KEYS[1]
local cmd = ARGV[1]
-- Locals: Lua 5.1 looks globals up in a table on every use.
local tinsert, smatch, ssub, sformat = table.insert, string.match, string.sub, string.format
local tostring, tonumber, pairs, ipairs, unpack = tostring, tonumber, pairs, ipairs, unpack
local rcall, pcall_ = redis.call, redis.pcall
-- Key and field names built once per call, not once per op.
local K_OPS, K_COUNTS, K_REL, K_BLOCKED = P .. ':ops', P .. ':counts', P .. ':rel', P .. ':blocked'
local K_DEAD, K_DEADKEY, K_DEADREV = P .. ':dead', P .. ':deadkey', P .. ':deadrev'
local K_DEADCUR, K_JOBMIN, K_DEADGR = P .. ':deadcur', P .. ':jobmin', P .. ':deadgr'
local K_OWES = P .. ':owes'
-- A worker's own replays of one tuple's letters (see replay).
local K_REPLAYN, K_REPLAYZ, K_LEFT = P .. ':replayn', P .. ':replayz', P .. ':left'
local REPLAYS_WINDOW_MS = 3600000
local K_READY = { g = P .. ':ready:g', r = P .. ':ready:r' }
local F_PENDING = { g = 'pg', r = 'pr' }
-- Per relation and op kind, without building a lookup string per op.
local lex_keys, rel_fields = { g = {}, r = {} }, { g = {}, r = {} }
local function lex_key(rel, op)
  local k = lex_keys[op][rel]
  if not k then
    k = P .. ':lex:' .. rel .. '|' .. op
    lex_keys[op][rel] = k
  end
  return k
end
local function rel_field(rel, op)
  local k = rel_fields[op][rel]
  if not k then
    k = rel .. '|' .. op
    rel_fields[op][rel] = k
  end
  return k
end

-- Numbers stay strings (compared as strings, passed to Redis as strings):
-- turning them into numbers and back costs more than everything else an
-- entry needs.
local function parse(v)
  if not v then return nil end
  local seq, first, since, op, state, job, writer, ifseq, cond = smatch(v,
    '^(%d+)|(%d+)|(%d+)|([gr])|([rjtb])|([^|]*)|([^|]*)|(%d*)|(.*)$')
  -- Longer numbers than a signed 64-bit integer holds are not fga-wb's.
  if not seq or #seq > 18 or #first > 18 or #since > 18 then return nil end
  return { seq = seq, first = first, since = since, op = op, state = state, job = job,
           writer = writer, ifseq = ifseq ~= '' and ifseq or nil, cond = cond }
end

-- A count or a time fga-wb wrote: digits, at most 15 of them (exact in a
-- double); else nil (a negative count or time is none fga-wb wrote). `tonumber` also takes "nan", "inf"
-- and "1e30", which no comparison or `math.max` reads as a count, and
-- which reach Rust as the lowest 64-bit integer.
local function as_count(v)
  if type(v) == 'number' then v = tostring(v) end
  if type(v) ~= 'string' or #v > 15 or not smatch(v, '^%d+$') then return nil end
  return tonumber(v)
end

-- The pending count of kind `kind` ('g' or 'r'), as P:counts holds it
-- (`v`; none is 0); one fga-wb did not write is read as the ready set's
-- size instead: read as 0, it kept the flushers from looking. pcall: read
-- after a call's writes.
local function pending_count(v, kind)
  if not v then return 0 end
  local n = as_count(v) or pcall_('ZCARD', K_READY[kind])
  return type(n) == 'number' and n or 0
end

local function encode(e)
  return e.seq .. '|' .. e.first .. '|' .. e.since .. '|' .. e.op .. '|' .. e.state .. '|' ..
    (e.job or '') .. '|' .. (e.writer or '') .. '|' .. (e.ifseq or '') .. '|' .. e.cond
end

-- "type:id#relation@user" -> "type#relation", remembered per call (ops of
-- one call are mostly on a few relations).
local rels_of = {}
local function rel_of(key)
  local r = rels_of[key]
  if r ~= nil then return r or nil end
  local object, relation = smatch(key, '^([^#]*)#([^@]*)@')
  if object then
    r = (smatch(object, '^([^:]*):') or object) .. '#' .. relation
  end
  rels_of[key] = r or false
  return r
end

-- Values per command when a list is passed in parts: Lua's stack caps what
-- `unpack` can pass (8,000 slots, the function's own included: 8,000 at
-- once failed, "too many results to unpack"). Even, for lists of pairs
-- (field value, score member).
local PART = 4000

-- `cmd key list[1..n]` (without `key` when it is false), in parts of
-- PART. `call`: rcall, or pcall_ where a key of the wrong type must not
-- abort the script.
local function in_parts(call, cmd, key, list, n)
  for i = 1, n, PART do
    local last = math.min(i + PART - 1, n)
    if key then call(cmd, key, unpack(list, i, last)) else call(cmd, unpack(list, i, last)) end
  end
end

-- HMGET of `hash`'s `fields`, in parts as in_parts: values in order (false:
-- none).
local function hmget(hash, fields)
  local out, n = {}, #fields
  for i = 1, n, PART do
    local last = math.min(i + PART - 1, n)
    local part = rcall('HMGET', hash, unpack(fields, i, last))
    for j = 1, last - i + 1 do out[i + j - 1] = part[j] end
  end
  return out
end

-- t[k], a table created on first use.
local function slot(t, k)
  local v = t[k]
  if not v then
    v = {}
    t[k] = v
  end
  return v
end

-- Keys this call found to be of the type it writes (or absent).
local typed = {}

-- What is wrong with `k` if it holds another type than `t` (data that is
-- not fga-wb's under the prefix), else nil.
local function wrong_type(k, t)
  if typed[k] then return nil end
  local got = rcall('TYPE', k)['ok']
  if got ~= 'none' and got ~= t then
    return 'fga-wb: Redis key ' .. k .. ' holds a ' .. got .. ', expected a ' .. t ..
      '; it was not written by fga-wb (remove it, or use another redis.key_prefix)'
  end
  typed[k] = true
  return nil
end

-- Raises, naming `k`, when it holds another type than `t`. Redis keeps what
-- a script wrote before an error, and a command on a key of the wrong type
-- is one: so the frequent calls look at every key they write before their
-- first write that matters, and an aborted call has changed nothing (an op
-- taken out of the ready set but left pending would never be written).
local function want(k, t)
  local bad = wrong_type(k, t)
  if bad then error({ err = bad }) end
end

-- Counter changes, summed in Lua and written once per call. HINCRBY on a
-- field that is not a number would abort the script after earlier writes
-- (which Redis does not undo), so a bad counter is reset, not fatal.
local deltas = {}
local function incr(hash, field, d)
  local h = slot(deltas, hash)
  h[field] = (h[field] or 0) + d
end

local function flush_incrs()
  for hash, _ in pairs(deltas) do want(hash, 'hash') end
  for hash, fields in pairs(deltas) do
    for field, d in pairs(fields) do
      if d ~= 0 then
        local r = pcall_('HINCRBY', hash, field, d)
        if type(r) == 'table' and r.err then
          rcall('HSET', hash, field, d)
        elseif r == 0 and hash == K_REL and rcall('ZCARD', P .. ':lex:' .. field) == 0 then
          -- No op buffered under that relation name any more: it goes.
          -- Names can come from input (revokes are not checked against
          -- the model), and every Read lists them all. Not while its index
          -- holds ops: a count that drifted low (data fga-wb did not write)
          -- must still list the relation for a check with no model, which
          -- then counts its ops from the index.
          rcall('HDEL', hash, field)
        end
      end
    end
  end
  deltas = {}
end

-- Collected writes, issued once per call. Each key's final state wins:
-- setting a member and removing it again in one call does only the last.
local zsets = {}   -- zset -> member -> score, or false to remove
local hashes = {}  -- hash -> field -> value, or false to delete
local function zset(z, member, score)
  slot(zsets, z)[member] = score
end
local function hset(h, field, value)
  slot(hashes, h)[field] = value
end

-- `want` for every key the collected writes touch.
local function want_collected()
  for z, _ in pairs(zsets) do want(z, 'zset') end
  for h, _ in pairs(hashes) do want(h, 'hash') end
  for h, _ in pairs(deltas) do want(h, 'hash') end
end

-- Order matters besides: the entries themselves (P:ops), which make an op
-- count as buffered, are written last.
local function write_hash(h, fields)
  local set, del, ns, nd = {}, {}, 0, 0
  for f, v in pairs(fields) do
    if v then
      set[ns + 1] = f
      set[ns + 2] = v
      ns = ns + 2
    else
      nd = nd + 1
      del[nd] = f
    end
  end
  in_parts(rcall, 'HDEL', h, del, nd)
  in_parts(rcall, 'HSET', h, set, ns)
end

local function apply_writes()
  want_collected()
  local ops = hashes[K_OPS]
  hashes[K_OPS] = nil
  for z, members in pairs(zsets) do
    local add, rem, na, nr = {}, {}, 0, 0
    for m, score in pairs(members) do
      if score then
        add[na + 1] = score
        add[na + 2] = m
        na = na + 2
      else
        nr = nr + 1
        rem[nr] = m
      end
    end
    in_parts(rcall, 'ZREM', z, rem, nr)
    in_parts(rcall, 'ZADD', z, add, na)
  end
  for h, fields in pairs(hashes) do write_hash(h, fields) end
  flush_incrs()
  if ops then write_hash(K_OPS, ops) end
  zsets, hashes = {}, {}
end

-- Refuses to run (before writing anything) when a key holds another type than
-- fga-wb writes there: someone else's data under our prefix. Used by the rare
-- commands that write many kinds of keys; the frequent ones rely on the order
-- of their writes (see apply_writes) and Redis's own WRONGTYPE.
local function expect_types(list)
  for _, kt in ipairs(list) do
    local bad = wrong_type(kt[1], kt[2])
    if bad then return bad end
  end
  local seq = rcall('GET', P .. ':seq')
  if seq and not tonumber(seq) then
    return 'fga-wb: Redis key ' .. P .. ':seq holds ' .. ssub(seq, 1, 40) ..
      ', expected a number; it was not written by fga-wb'
  end
  return nil
end

-- Redis's own clock, so processes with skewed clocks agree on ages.
local function redis_ms()
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- How long a writer's last heartbeat is kept after it stopped beating.
local BEATS_KEEP_MS = 600000

-- How long writes are remembered (written.rs KEEP).
local WRITTEN_KEEP_MS = 120000
-- Most objects remembered one by one (written.rs MAX_OBJECTS): writes on
-- distinct objects can outrun WRITTEN_KEEP_MS (a bulk import), and a mark
-- takes some 100 bytes. Past it the oldest marks go, and when they went
-- counts as a write on every object (P:written "#objects").
local WRITTEN_OBJECTS_MAX = 262144
-- Past this many relations in P:written, those older than WRITTEN_KEEP_MS
-- are let go (revokes are not checked against the model, so their
-- relations can be anything an application passes).
local WRITTEN_RELS_MAX = 4096

-- Notes that the ops on `keys` were just applied. Called last in a script:
-- pcall, so keys of the wrong type never abort it after its other writes.
local function note_written(keys)
  local now = redis_ms()
  local h, z = {}, {}
  local seen, marked = {}, {}
  for _, key in ipairs(keys) do
    -- A chunk's ops are mostly on a few objects: each mark once.
    local mark = smatch(key, '^([^#]*#[^@]*)@')
    if mark and not marked[mark] then
      marked[mark] = true
      z[#z + 1] = now
      z[#z + 1] = mark
      local rel = rel_of(key)
      if rel and not seen[rel] then
        seen[rel] = true
        h[#h + 1] = rel
        h[#h + 1] = now
      end
    end
  end
  in_parts(pcall_, 'HSET', P .. ':written', h, #h)
  in_parts(pcall_, 'ZADD', P .. ':wobj', z, #z)
  pcall_('ZREMRANGEBYSCORE', P .. ':wobj', '-inf', now - WRITTEN_KEEP_MS)
  local objects = pcall_('ZCARD', P .. ':wobj')
  if type(objects) == 'number' and objects > WRITTEN_OBJECTS_MAX then
    pcall_('ZREMRANGEBYRANK', P .. ':wobj', 0, objects - WRITTEN_OBJECTS_MAX - 1)
    pcall_('HSET', P .. ':written', '#objects', now)
  end
  local rels = pcall_('HLEN', P .. ':written')
  -- A look over them all at most every 12 s: many relations all written
  -- lately would have it run at every finish.
  if type(rels) == 'number' and rels > WRITTEN_RELS_MAX
      and pcall_('SET', P .. ':wprune', 1, 'PX', WRITTEN_KEEP_MS / 10, 'NX') then
    local all = pcall_('HGETALL', P .. ':written')
    if type(all) == 'table' and not all.err then
      local old = {}
      for i = 1, #all, 2 do
        local at = as_count(all[i + 1])
        if at and at < now - WRITTEN_KEEP_MS then old[#old + 1] = all[i] end
      end
      in_parts(pcall_, 'HDEL', P .. ':written', old, #old)
    end
  end
end

-- Milliseconds since the newest write a check on `object` can depend on
-- ({rel, scope} pairs; scope 0: any object), -1 if none is remembered; 0 when
-- the keys cannot be read (then the check asks for fresh answers).
local function written_ago(rels, object, any)
  local newest
  local function see(v)
    if type(v) == 'table' and v.err then v = redis_ms() end
    -- Not a time fga-wb wrote: unreadable, so read as now (fresh answers).
    if v then v = as_count(v) or redis_ms() end
    if v and (not newest or v > newest) then newest = v end
  end
  if any then
    local all = pcall_('HVALS', P .. ':written')
    if type(all) == 'table' and all.err then see(all) else
      for _, v in ipairs(all) do see(v) end
    end
  else
    see(pcall_('HGET', P .. ':written', '*'))
  end
  local trimmed = false
  for _, r in ipairs(rels) do
    if r[2] == 0 then
      see(pcall_('HGET', P .. ':written', r[1]))
    else
      see(pcall_('ZSCORE', P .. ':wobj', object .. '#' .. (smatch(r[1], '#(.*)$') or r[1])))
      -- An object's mark may have gone with the oldest (see note_written).
      if not trimmed then
        trimmed = true
        see(pcall_('HGET', P .. ':written', '#objects'))
      end
    end
  end
  if not newest then return -1 end
  return math.max(redis_ms() - newest, 0)
end

-- The next value of the counter `key` (P:termseq, P:jobseq, P:deadseq,
-- P:seq in a replay). Redis's own error for a key that holds what fga-wb
-- did not write does not name the key; this one does. Any other error is
-- Redis's own, as it is: often the call's first write, the counter is
-- what a full Redis (maxmemory) refuses, and that is transient, not data
-- to remove.
local function next_of(key)
  local v = pcall_('INCR', key)
  if type(v) == 'table' and v.err then
    if not (string.find(v.err, 'WRONGTYPE', 1, true) or string.find(v.err, 'not an integer', 1, true)) then
      error(v)
    end
    error({ err = 'fga-wb: Redis key ' .. key .. ' holds something other than a whole number; ' ..
      'it was not written by fga-wb (remove it, or use another redis.key_prefix)' })
  end
  return v
end

-- Built here, not at the top: the script's top level runs on every call,
-- and this list is needed only by the rare calls that check types.
local function check_keys(keys)
  local list = {
    { P .. ':ops', 'hash' }, { P .. ':ready:g', 'zset' }, { P .. ':ready:r', 'zset' },
    { P .. ':counts', 'hash' }, { P .. ':rel', 'hash' }, { P .. ':stats', 'hash' },
    { P .. ':gen', 'hash' }, { P .. ':dead', 'hash' }, { P .. ':seq', 'string' },
    { P .. ':deadseq', 'string' }, { P .. ':owners', 'zset' }, { P .. ':jobs', 'hash' },
    { P .. ':jobc', 'hash' }, { P .. ':jobq', 'zset' }, { P .. ':jobrun', 'hash' },
    { P .. ':blocked', 'zset' }, { P .. ':terms', 'hash' }, { P .. ':termseq', 'string' },
    { P .. ':holdfor', 'hash' }, { P .. ':heldover', 'hash' },
  }
  local seen = {}
  for _, key in ipairs(keys) do
    local rel = rel_of(key)
    if rel and not seen[rel] then
      seen[rel] = true
      tinsert(list, { P .. ':lex:' .. rel .. '|g', 'zset' })
      tinsert(list, { P .. ':lex:' .. rel .. '|r', 'zset' })
    end
  end
  return expect_types(list)
end

local function publish(msg)
  -- ARGV[2] is always the publish command: PUBLISH, or SPUBLISH on a cluster.
  rcall(ARGV[2], P .. ':events', msg)
end

-- The bookkeeping of an entry's existence: its latest op in the lex index and
-- per-relation counts, and the counts by state. `d` is +1 when an entry
-- appears in state `state`, -1 when it leaves it.
local function count_state(e, d, key)
  local st = e.state
  if st == 'r' or st == 'b' then incr(K_COUNTS, F_PENDING[e.op], d) end
  if st == 'b' and key then zset(K_BLOCKED, key, d > 0 and e.first or false) end
  if st == 't' or st == 'b' then incr(K_COUNTS, 't', d) end
  if st == 'j' then incr(K_COUNTS, 'j', d) end
end

local function index_latest(key, e, d)
  local rel = rel_of(key)
  if not rel then return end
  incr(K_REL, rel_field(rel, e.op), d)
  zset(lex_key(rel, e.op), key, d > 0 and 0 or false)
end

-- Entries read in this call, with their writes collected in `hashes`.
local cache = {}
-- Keys whose unreadable entry `admit` took out of the indexes in this call:
-- their removals are collected, so nothing may add them back directly.
local repaired = {}

-- Puts key `k`'s raw entry `v` (false: none) in the cache; returns 1 if it
-- cannot be read, else 0.
local function admit(k, v)
  local e = parse(v)
  cache[k] = e or false
  if not v or e then return 0 end
  -- Unreadable: treated as absent; whatever replaces it overwrites it.
  -- The indexes it is found in say what it was counted as.
  repaired[k] = true
  hset(P .. ':ops', k, false)
  local rel = rel_of(k)
  for _, kind in ipairs({ 'g', 'r' }) do
    if rcall('ZSCORE', P .. ':ready:' .. kind, k) then
      incr(P .. ':counts', 'p' .. kind, -1)
      zset(P .. ':ready:' .. kind, k, false)
    end
    if rel and rcall('ZSCORE', P .. ':lex:' .. rel .. '|' .. kind, k) then
      incr(P .. ':rel', rel .. '|' .. kind, -1)
      zset(P .. ':lex:' .. rel .. '|' .. kind, k, false)
    end
  end
  zset(P .. ':blocked', k, false)
  return 1
end

-- Raw entries of `keys`, in order (false: none). The frequent calls read
-- entries of one known shape with a pattern and rewrite them as strings:
-- `parse` and `encode` (a table of nine strings per entry) cost several
-- times that, and the calls touch every op two to four times. Entries of
-- any other shape, and keys this call already loaded, go through `admit`.
local function read_raw(keys)
  local raw = hmget(K_OPS, keys)
  -- Read as a hash: no need to look at its type before writing it.
  if #keys > 0 then typed[K_OPS] = true end
  return raw
end

local function load(keys)
  local missing, n = {}, 0
  for _, k in ipairs(keys) do
    if cache[k] == nil then
      n = n + 1
      missing[n] = k
    end
  end
  local raw = read_raw(missing)
  local corrupt = 0
  for i = 1, n do
    local k = missing[i]
    -- Listed twice: read once.
    if cache[k] == nil then corrupt = corrupt + admit(k, raw[i]) end
  end
  return corrupt
end

local function put(key, e)
  cache[key] = e or false
  hset(K_OPS, key, e and encode(e) or false)
end

local function set_ready(key, e, on)
  zset(K_READY[e.op], key, on and e.first or false)
end

-- Whether P:owes has fields, read once per call: nearly always not, and
-- then no op needs a look there.
local owes_n
local function owes_any()
  if owes_n == nil then
    local n = pcall_('HLEN', K_OWES)
    owes_n = type(n) == 'number' and n or 0
  end
  return owes_n > 0
end

-- `key`'s field in P:owes, as this call left it if it changed it.
local function owed_field(key)
  local v = (hashes[K_OWES] or {})[key]
  if v == nil then v = owes_any() and pcall_('HGET', K_OWES, key) end
  return type(v) == 'string' and v or nil
end

-- What `e`, key `key`'s latest op, a grant, owes, as its P:owes field says
-- after its seq ('' or '|ifseq'); nil: nothing.
local function debt_of(key, e)
  local v = owed_field(key)
  if v and ssub(v, 1, #e.seq) == e.seq then
    local rest = ssub(v, #e.seq + 1)
    if rest == '' or ssub(rest, 1, 1) == '|' then return rest end
  end
  return nil
end

-- Whether `e`, key `key`'s latest op, is a revoke or a grant that owes
-- one (unless a write lands, too: until it is known to have, it is owed).
local function revokes(key, e)
  return e.op == 'r' or debt_of(key, e) ~= nil
end

-- Notes that `key`'s latest op, `seq`, owes a revoke; `unless`: unless the
-- write of op `unless` lands.
local function owe(key, seq, unless)
  owes_any()
  owes_n = owes_n + 1
  hset(K_OWES, key, unless and (seq .. '|' .. unless) or seq)
end

-- Forgets what `key`'s latest op owed: it ended, or a newer op owes nothing.
local function owes_nothing(key)
  if owes_any() then hset(K_OWES, key, false) end
end

-- Removes an entry for good (applied, dead-lettered, cleared).
local function drop(key, e)
  count_state(e, -1, key)
  index_latest(key, e, -1)
  if e.state == 'r' then set_ready(key, e, false) end
  put(key, nil)
  owes_nothing(key)
end

-- Moves an entry to another state, keeping the counts right. `writer` and
-- `job` (when given) set who writes it and which job holds it.
local function move(key, e, state, writer, job)
  count_state(e, -1, key)
  if e.state == 'r' then set_ready(key, e, false) end
  e.state = state
  e.writer = (state == 't' or state == 'b') and (writer or e.writer) or ''
  e.job = (state == 'j' or state == 't') and (job or e.job) or ''
  if state ~= 'b' then e.ifseq = nil end
  count_state(e, 1, key)
  if state == 'r' then set_ready(key, e, true) end
  put(key, e)
end

-- Other processes' cached answers compare these generations on every check,
-- so a change needs no message.
local function bump_gen(rels)
  local any = false
  for rel, _ in pairs(rels) do
    incr(P .. ':gen', rel, 1)
    any = true
  end
  if any then incr(P .. ':gen', '*', 1) end
end

-- A relation's index of transient letters (see P:deadrev, P:deadgr).
local function deadrev_key(rel, index)
  return (index or K_DEADREV) .. ':' .. rel
end

-- Lists `key` in `index` (P:deadrev or P:deadgr) and its relation's, and
-- out of the other; nil: out of both. pcall: a key of another type must
-- not abort the call after its other writes.
local function index_dead_for_checks(key, index)
  local rel = rel_of(key)
  for _, ix in ipairs({ K_DEADREV, K_DEADGR }) do
    for _, z in ipairs({ ix, rel and deadrev_key(rel, ix) or nil }) do
      if ix == index then pcall_('ZADD', z, 0, key) else pcall_('ZREM', z, key) end
    end
  end
end

-- Lists `key` in P:deadcur at `first` (its newest letter died of transient
-- causes), or takes it out (nil).
local function index_dead_current(key, first)
  if first then pcall_('ZADD', K_DEADCUR, first, key) else pcall_('ZREM', K_DEADCUR, key) end
end

-- Both indexes out: `key`'s newest letter is superseded, replayed or gone.
local function unindex_dead(key)
  index_dead_for_checks(key, nil)
  index_dead_current(key, nil)
end

-- A letter's fields, or nil when it is not one fga-wb wrote.
local function letter(raw)
  if not raw then return nil end
  local ok, d = pcall(cjson.decode, raw)
  if not ok or type(d) ~= 'table' or type(d.key) ~= 'string' or (d.op ~= 'g' and d.op ~= 'r') then
    return nil
  end
  if type(d.cond) ~= 'string' then d.cond = '' end
  return d
end

-- Writes of the ops `seqs` on `keys` landed (or, `cleared`, a clear dropped
-- them): the keys' dead letters of those ops or older ones are stale (see
-- P:deadkey). A letter of a newer op stays: a write that lands late (a
-- writer back from a pause) must not hide it. So does, for a clear, the
-- letter of a revoke that died of transient causes (revokes only, as
-- owed_revoke reads them, though P:deadrev indexes some grants too): the
-- op dropped may never have reached OpenFGA, which may still hold what
-- that revoke revokes, so checks keep failing closed on it until a replay.
-- A grant's letter goes as before: a replay (workers replay transient
-- letters by themselves) must not grant what the application took back
-- since; an owing grant's (see finish) becomes the revoke it owed. Free
-- while no key has letters.
local function supersede_letters(keys, seqs, cleared)
  if rcall('HLEN', K_DEADKEY) == 0 then return end
  local ids = hmget(K_DEADKEY, keys)
  for i, k in ipairs(keys) do
    local id = ids[i]
    if id == '0' then
      -- Left by an older version (see P:deadkey): reads as none.
      rcall('HDEL', K_DEADKEY, k)
    elseif id then
      local d = letter(rcall('HGET', K_DEAD, id))
      if cleared and d and d.transient == true and d.op == 'g' and d.owes == true then
        -- A grant given up that owed a revoke: with the op after it
        -- dropped, what is owed is that revoke (replaying the grant would
        -- grant what the application revoked before it). Kept as one.
        d.op, d.cond, d.owes = 'r', '', nil
        d.reason = tostring(d.reason or '') ..
          '; kept as the revoke this grant owed when a clear dropped the op after it'
        rcall('HSET', K_DEAD, id, cjson.encode(d))
        index_dead_for_checks(k, K_DEADREV)
        index_dead_current(k, d.first)
      end
      local kept = cleared and d and d.transient == true and d.op == 'r'
      if not kept and (not d or (tonumber(d.seq) or 0) <= (tonumber(seqs[i]) or 0)) then
        -- Deleted, not set to 0 (which every reader takes as none): the
        -- field of every tuple ever dead-lettered stayed for good, and so
        -- did this lookup on every finish.
        rcall('HDEL', K_DEADKEY, k)
        unindex_dead(k)
      elseif kept then
        -- Replayable again (a replay left it while the op cleared was
        -- buffered): workers look at the letters only when this moves.
        pcall_('HINCRBY', P .. ':stats', 'dead_transient', 1)
      end
    end
  end
end

-- Drops what the workers counted of `keys`' replays (see replay), and
-- their places in P:left.
local function drop_counts(keys)
  in_parts(pcall_, 'HDEL', K_REPLAYN, keys, #keys)
  in_parts(pcall_, 'ZREM', K_REPLAYZ, keys, #keys)
  in_parts(pcall_, 'SREM', K_LEFT, keys, #keys)
end

-- Forgets the worker's counts of replays of those of `keys` that have no
-- current letter now (see replay): an op on them landed, or their letters
-- were superseded, replayed by an operator or purged. A letter kept (a
-- clear keeps a transient revoke's) keeps its count. One look when there
-- are no counts.
local function forget_replays(keys)
  if #keys == 0 or pcall_('EXISTS', K_REPLAYN, K_LEFT) == 0 then return end
  local ok, ids = pcall(hmget, K_DEADKEY, keys)
  if not ok then return end
  local gone = {}
  for i, k in ipairs(keys) do
    if not ids[i] or ids[i] == '0' then gone[#gone + 1] = k end
  end
  drop_counts(gone)
end

-- `key`'s current letter (the newest of its ops that died, no newer op
-- applied or written off since) and its id, or nil; nil too for indexes of
-- another type (the caller's own check of their types names them).
local function current_letter(key)
  local id = pcall_('HGET', K_DEADKEY, key)
  if type(id) ~= 'string' or id == '0' then return nil end
  local raw = pcall_('HGET', K_DEAD, id)
  local d = type(raw) == 'string' and letter(raw)
  if d then return d, id end
  return nil
end

-- The letter of a revoke of `key` that died of transient causes and is still
-- the key's newest (no newer op has been applied or written off since), and
-- its id: OpenFGA may still hold what it revokes. Nil otherwise, and for
-- indexes of another type (the caller's own check of their types names
-- them).
local function owed_revoke(key)
  local d, id = current_letter(key)
  if d and d.transient == true and d.op == 'r' then return d, id end
  return nil
end

-- Whether `key`'s newest letter is of a grant given up after transient
-- failures that owed a revoke (see finish), still current: neither it nor
-- that revoke reached OpenFGA.
local function owing_letter(key)
  local d = current_letter(key)
  return d and d.transient == true and d.op == 'g' and d.owes == true or false
end

-- `v` (a number a letter kept) as a place in line or a time before
-- `limit`, as entries write them; nil if it is not one.
local function place(v, limit)
  v = tonumber(v)
  if v and v >= 1 and v == math.floor(v) and v < (tonumber(limit) or 0) then
    return string.format('%.0f', v)
  end
  return nil
end

-- A new pending op on a key that has none; `first` (its place in line)
-- defaults to its own seq.
local function add_entry(key, op, cond, seq, now, first)
  local e = { seq = seq, first = first or seq, since = now, op = op, state = 'r', job = '', writer = '', cond = cond }
  count_state(e, 1, key)
  index_latest(key, e, 1)
  set_ready(key, e, true)
  return e
end

-- Buffers a letter's op again on a key with no entry, back in line where
-- its op was and pending since it was: to `unfinished` (flush --wait) it is
-- the op acknowledged then, not a new one, and the oldest pending op's age
-- stays true.
local function rebuffer(d, now)
  local seq = sformat('%.0f', next_of(P .. ':seq'))
  local e = add_entry(d.key, d.op, d.cond, seq, now, place(d.first or d.seq, seq))
  local since = place(d.since, now)
  if since then e.since = since end
  put(d.key, e)
  return e
end

-- The keys and seqs of job `id`'s ops (`job`: its JSON), or nil if it
-- cannot be read. As enqueue listed them, for a job that still looks like
-- one enqueue stored; any other (rewritten for a retry, queued by an older
-- version, or not fga-wb's) is decoded.
local function job_ops(id, job)
  if not job then return nil end
  local keys, seqs = {}, {}
  local list = ssub(job, 1, 6) == '{"id":' and rcall('HGET', P .. ':jobc', id)
  if list then
    local i = 0
    for key, seq in string.gmatch(list, '([^\n]+)\n(%d+)') do
      i = i + 1
      keys[i], seqs[i] = key, seq
    end
  end
  if #keys == 0 then
    local ok, decoded = pcall(cjson.decode, job)
    if not (ok and type(decoded) == 'table' and type(decoded.ops) == 'table') then return nil end
    for i, o in ipairs(decoded.ops) do
      -- An op that is not an object: the job cannot be read (o.key would
      -- raise).
      if type(o) ~= 'table' then return nil end
      keys[i] = tostring(o.key)
      seqs[i] = string.format('%d', tonumber(o.seq) or 0)
    end
  end
  return keys, seqs
end

-- Jobs Redis names worker `w` as running, other than those in `running`
-- (a set of ids), go back to the queue, and ops blocked behind their ops
-- are ready: a worker that runs jobs names them, and only the others are
-- stray. So are ops it is named as writing itself: a worker writes only
-- through jobs, and the ops a replay takes are its until they are in a
-- job, while the worker does not look. Returns the ops handed back, those
-- folded into newer ops, and the jobs.
local function hand_back_jobs(w, now, running)
  local ran, keys, seqs, gone = {}, {}, {}, {}
  -- Ops a job it runs lists: what is blocked behind them stays, even if a
  -- stray job lists the same op (one left by an enqueue that failed).
  local kept, unread = {}, false
  for _, id in ipairs(rcall('SMEMBERS', P .. ':wj:' .. w)) do
    local runs = rcall('HGET', P .. ':jobrun', id) == w
    local job = runs and rcall('HGET', P .. ':jobs', id)
    local ks, ss = job_ops(id, job)
    if not runs then
      -- Not its job any more (handed back, set aside): only a member left.
      gone[#gone + 1] = id
    elseif running[id] then
      if not ks then unread = true end
      for i, k in ipairs(ks or {}) do kept[k .. '\n' .. ss[i]] = true end
    else
      ran[#ran + 1] = id
      if job then zset(P .. ':jobq', id, now) end
      for i, k in ipairs(ks or {}) do
        keys[#keys + 1], seqs[#seqs + 1] = k, ss[i]
      end
    end
  end
  local taken = rcall('SMEMBERS', P .. ':w:' .. w)
  load(keys)
  load(taken)
  local mine, folded = {}, 0
  -- A blocked op waiting behind an op nobody writes: folded into it.
  local function ready(key, e)
    move(key, e, 'r')
    mine[#mine + 1] = key
    folded = folded + 1
  end
  for i, key in ipairs(keys) do
    local e = cache[key]
    -- Behind this job's op, not behind a later job's op on the same key.
    if e and e.state == 'b' and e.writer == w and e.ifseq == seqs[i] and not kept[key .. '\n' .. seqs[i]] then
      ready(key, e)
    end
  end
  for _, key in ipairs(taken) do
    local e = cache[key]
    if e and e.state == 't' and e.writer == w then
      move(key, e, e.job ~= '' and 'j' or 'r')
      mine[#mine + 1] = key
    elseif e and e.state == 'b' and e.writer == w and not unread and not kept[key .. '\n' .. (e.ifseq or '')] then
      -- Behind an op of its own that no job it runs lists, so nobody
      -- writes it: a lost take's, or a job's op found stale or set aside
      -- with its job. As hand_back does.
      ready(key, e)
    end
  end
  apply_writes()
  for _, id in ipairs(ran) do
    rcall('HDEL', P .. ':jobrun', id)
    gone[#gone + 1] = id
  end
  in_parts(rcall, 'SREM', P .. ':wj:' .. w, gone, #gone)
  in_parts(rcall, 'SREM', P .. ':w:' .. w, mine, #mine)
  return #mine, folded, #ran
end

-- Hands back what writer `w` holds: the ops it is writing are ready again
-- (or back with their job), ops blocked behind its writes ready, the jobs
-- it runs queued; with `only`, just the ops of those keys. Its ops and jobs
-- back first: a call that fails after this leaves the writer's sets to the
-- next look, never its holdings in neither place. Returns the ops handed
-- back, those folded into newer ops, and the jobs.
local function hand_back(w, now, only)
  local keys = only or rcall('SMEMBERS', P .. ':w:' .. w)
  load(keys)
  local ops, folded = 0, 0
  for _, key in ipairs(keys) do
    local e = cache[key]
    if e and e.writer == w then
      if e.state == 't' then
        move(key, e, e.job ~= '' and 'j' or 'r')
        ops = ops + 1
      elseif e.state == 'b' then
        -- The older op's write may or may not have landed; the newer op
        -- is written after it either way. Its writer will never finish
        -- it: it ends here, folded into the newer op (which may have been
        -- a grant).
        move(key, e, 'r')
        ops = ops + 1
        folded = folded + 1
      end
    end
  end
  local ran = {}
  for _, id in ipairs(only and {} or rcall('SMEMBERS', P .. ':wj:' .. w)) do
    if rcall('HGET', P .. ':jobrun', id) == w then
      ran[#ran + 1] = id
      if rcall('HEXISTS', P .. ':jobs', id) == 1 then
        zset(P .. ':jobq', id, now)
      end
    end
  end
  apply_writes()
  for _, id in ipairs(ran) do rcall('HDEL', P .. ':jobrun', id) end
  if only then
    in_parts(rcall, 'SREM', P .. ':w:' .. w, keys, #keys)
  else
    rcall('DEL', P .. ':w:' .. w, P .. ':wj:' .. w)
  end
  return ops, folded, #ran
end

-- Counts ops handed back (and those folded into newer ops), and tells the
-- processes that take them.
local function note_handed_back(ops, folded)
  if folded > 0 then incr(P .. ':stats', 'coalesced', folded) end
  if ops > 0 then
    incr(P .. ':stats', 'reclaimed', ops)
    publish('finished')
  end
end

-- Writers whose lease ended: what they were writing is ready again (or back
-- with its job), and the jobs they ran go back to the queue.
--
-- A writer whose lease ended while it was writing (it crashed, or lost
-- Redis for longer than its lease) may have a Write under way that commits
-- on the server up to its hold (P:holdfor) after the lease's end: a Write
-- ends within the lease on the writer's side, not on the server's. What it
-- holds stays its own until then (P:heldover), so that no newer op on those
-- keys is written first and undone by the late one; checks go on counting
-- its ops as in flight, and a newer op waits behind them. A writer that
-- renews meanwhile carries on with what it holds: nothing went to others.
local function reclaim(now)
  local dead = rcall('ZRANGEBYSCORE', P .. ':owners', '-inf', now, 'WITHSCORES', 'LIMIT', 0, 20)
  local reclaimed, folded = 0, 0
  for i = 1, #dead, 2 do
    local w, ends = dead[i], tonumber(dead[i + 1]) or 0
    -- "inf" (not fga-wb's) would keep what it holds for good.
    local hold = as_count(rcall('HGET', P .. ':holdfor', w)) or 0
    if hold > 0 and ends + hold > now and rcall('HEXISTS', P .. ':heldover', w) == 0
        and rcall('EXISTS', P .. ':w:' .. w, P .. ':wj:' .. w) > 0 then
      rcall('HSET', P .. ':heldover', w, ends)
      rcall('ZADD', P .. ':owners', ends + hold, w)
    else
      local ops, f = hand_back(w, now)
      reclaimed, folded = reclaimed + ops, folded + f
      rcall('HDEL', P .. ':holdfor', w)
      rcall('HDEL', P .. ':heldover', w)
      -- Its finish answers go too: a repeat from it now belongs to an
      -- earlier term once it renews, and until then finds nothing of its own.
      rcall('DEL', P .. ':fin:' .. w)
      rcall('ZREM', P .. ':owners', w)
      -- Its term too: whatever it renews with next is a new one.
      rcall('HDEL', P .. ':terms', w)
      -- And its note that its flushing is stopped (see record_work): a
      -- process restarting in a loop would add one per run.
      pcall_('HDEL', P .. ':stats', 'stopped:' .. w)
      -- Its last heartbeat stays (see confirmed); pruned by heartbeats later.
    end
  end
  note_handed_back(reclaimed, folded)
  return reclaimed
end

-- Renews `writer`'s lease; returns when its lease was to end (nil: it had
-- none) and its term. `had`: the highest term the writer has seen (callers
-- before it send none). A writer with no lease gets a new term: what it took
-- before was handed to others when its lease ended (reclaim), so the process
-- writes only ops taken in the term the latest call returned.
local function renew(writer, now, lease, had, hold)
  local ends = tonumber(rcall('ZSCORE', P .. ':owners', writer))
  -- A term that is not a number (not fga-wb's) is replaced like a missing
  -- one: a nil in a reply would cut it short. Drawn before the lease is
  -- written: a call that fails here (P:termseq not a number) must not
  -- leave the writer a lease without a new term, which its next call would
  -- take for its old one.
  -- Only as fga-wb writes it: a finish compares the stored text with the
  -- term's digits, so "7.0" or " 7", read as 7, made every finish of the
  -- writer stale for good.
  local stored = ends and rcall('HGET', P .. ':terms', writer)
  local term = type(stored) == 'string' and #stored <= 16
    and smatch(stored, '^[1-9]%d*$') and tonumber(stored)
  if not term then
    term = next_of(P .. ':termseq')
    -- Above any term the writer had (`had`): a Redis that lost its data
    -- (restarted empty, flushed) counts terms from scratch, and a writer
    -- that kept a higher one would take every op as not its own.
    had = tonumber(had) or 0
    if term <= had then
      term = had + 1
      rcall('SET', P .. ':termseq', term)
    end
    rcall('HSET', P .. ':terms', writer, term)
    hold = tonumber(hold) or 0
    if hold > 0 then
      rcall('HSET', P .. ':holdfor', writer, hold)
    else
      rcall('HDEL', P .. ':holdfor', writer)
    end
  end
  -- Alive after all, if reclaim was keeping what it holds past its lease.
  rcall('HDEL', P .. ':heldover', writer)
  -- Never shortened: a lease kept for a write whose outcome is unknown
  -- (see `lease`) outlasts the renewals meanwhile.
  local to = tonumber(now) + lease
  if not ends or ends < to then rcall('ZADD', P .. ':owners', to, writer) end
  return ends, term
end

-- Keeps `writer`'s lease to `to` (ms) at least; its lease's end now, or nil
-- once reclaimed: that is not brought back, since what it held went to
-- others already (see lease).
local function keep_lease(writer, to)
  local ends = tonumber(rcall('ZSCORE', P .. ':owners', writer))
  if ends and to and to > ends then
    rcall('ZADD', P .. ':owners', to, writer)
    ends = to
  end
  return ends
end

-- The write marks from before a new epoch or an acknowledged loss may be
-- gone with the data (a restart without it): checks count every relation
-- as just written (see P:written).
local function mark_all_written()
  pcall_('HSET', P .. ':written', '*', redis_ms())
end

-- A loss moves P:deadseq LOSS_GAP ahead (see heartbeat): with no letter
-- left, there is nothing for `index_old_letters` to walk (the common
-- case: a restart without data). pcall: keys of another type must not
-- abort the heartbeat after its other writes.
local function note_no_letters()
  if pcall_('HLEN', K_DEAD) == 0 then pcall_('SET', K_DEADCUR .. ':v', 'done') end
end

-- The store's epoch begins (its keys are first written, or again after a
-- loss).
local function begin_epoch(epoch)
  rcall('SET', P .. ':epoch', epoch)
  mark_all_written()
end

local function init_epoch(now)
  if rcall('EXISTS', P .. ':epoch') == 0 then begin_epoch(now) end
end

-- How long the answers of calls a writer may repeat are kept (push, finish,
-- a clear's step, a loss's ack).
local ANSWERS_KEEP_MS = 600000

-- The answer a writer's call `call` was given, as kept in the zset `key`
-- (members "call|answer", scored by call), or nil: the call is new.
local function answer_kept(key, call)
  local prior = pcall_('ZRANGEBYSCORE', key, call, call)
  return smatch(type(prior) == 'table' and prior[1] or '', '^%d+|(.*)$')
end

-- Keeps `answer` to the writer's call `call` in `key`, and lets go those
-- before its oldest call still unanswered, `oldest`. pcall: a key of
-- another type must not abort the call after its writes (a repeat would
-- do them again); it costs only the guard.
local function keep_answer(key, call, answer, oldest)
  if oldest ~= '' then pcall_('ZREMRANGEBYSCORE', key, '-inf', '(' .. oldest) end
  pcall_('ZADD', key, call, call .. '|' .. answer)
  pcall_('PEXPIRE', key, ANSWERS_KEEP_MS)
end

-- push pub now cap n (key op cond)*n [writer [call oldest]]
--   -> {seq, coalesced}*n .. {pending, corrupt}
-- seq is -1 for an op refused because the buffer is full.
--   call: the writer's id for this push, on a Redis Cluster, whose client
--   sends a call again after a dropped connection although it may have run
--   with only its reply lost (other writers' pushes may have run since: a
--   second run would fold its older ops over theirs). A call with an id
--   already answered only reads that answer. P:push:<writer> keeps the
--   answers of the writer's calls from `oldest` (its oldest unanswered) on.
if cmd == 'push' then
  local now, cap, n = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local call, oldest = ARGV[7 + 3 * n] or '', ARGV[8 + 3 * n] or ''
  local K_PUSHED = P .. ':push:' .. (ARGV[6 + 3 * n] or '')
  local answer = call ~= '' and answer_kept(K_PUSHED, call)
  if answer then
    local out = {}
    for item in string.gmatch(answer, '[^,]+') do out[#out + 1] = item end
    return out
  end
  local keys = {}
  for i = 0, n - 1 do keys[i + 1] = ARGV[6 + i * 3] end
  local corrupt = load(keys)
  local out, rels = {}, {}
  local acked, coalesced_total = 0, 0
  -- Workers running the jobs that hold keys of this call (false: none).
  local runners, blocked = {}, {}
  local function job_runner(job)
    if runners[job] == nil then runners[job] = rcall('HGET', P .. ':jobrun', job) or false end
    return runners[job]
  end
  local size = rcall('HLEN', K_OPS) - corrupt
  typed[K_OPS] = true
  local refused = false
  local last = rcall('INCRBY', P .. ':seq', n)
  if last == n then init_epoch(now) end
  -- A key met once in this call that has no entry, nearly every op, is
  -- written straight out as a string, its index members collected in
  -- plain arrays (`adds`): no entry table, no `encode`. A key met twice
  -- goes the general way, so its second op sees its first.
  local once = {}
  for _, key in ipairs(keys) do once[key] = once[key] == nil end
  -- A key just repaired goes the general way: the removals admit
  -- collected would undo a member added straight out.
  for key, _ in pairs(repaired) do once[key] = false end
  local adds = {}
  local function add(z, score, member)
    local a = slot(adds, z)
    a[#a + 1] = score
    a[#a + 1] = member
  end
  for i = 0, n - 1 do
    local key, op, cond = ARGV[6 + i * 3], ARGV[7 + i * 3], ARGV[8 + i * 3]
    local cur = cache[key]
    if not cur and size >= cap then
      out[2 * i + 1] = -1
      out[2 * i + 2] = 0
      refused = true
    elseif not cur and once[key] and K_READY[op] then
      -- As add_entry and put would write it.
      size = size + 1
      local seq = sformat('%.0f', last - n + 1 + i)
      incr(K_COUNTS, F_PENDING[op], 1)
      local rel = rel_of(key)
      if rel then
        rels[rel] = true
        incr(K_REL, rel_field(rel, op), 1)
        add(lex_key(rel, op), 0, key)
      end
      add(K_READY[op], seq, key)
      hset(K_OPS, key, seq .. '|' .. seq .. '|' .. now .. '|' .. op .. '|r||||' .. cond)
      acked = acked + 1
      out[2 * i + 1] = seq
      out[2 * i + 2] = 0
    else
      local seq = sformat('%.0f', last - n + 1 + i)
      local coalesced = 0
      local e
      if not cur then
        size = size + 1
        e = add_entry(key, op, cond, seq, now)
      else
        index_latest(key, cur, -1)
        count_state(cur, -1, key)
        if cur.state == 'r' then
          -- Folded into this op: it keeps its place in the queue.
          set_ready(key, cur, false)
          e = { seq = seq, first = cur.first, since = cur.since, op = op, state = 'r', job = '', writer = '', cond = cond }
          coalesced = 1
        elseif cur.state == 'b' then
          e = { seq = seq, first = cur.first, since = cur.since, op = op, state = 'b', job = '',
                writer = cur.writer, ifseq = cur.ifseq, cond = cond }
          coalesced = 1
        else
          -- Being written (by a process, or by the worker running the job
          -- that holds it): waits for that write to end. Held by a job
          -- still queued: superseded now (the job skips it when it runs).
          local writer = cur.state == 't' and cur.writer or job_runner(cur.job)
          if writer then
            e = { seq = seq, first = seq, since = now, op = op, state = 'b', job = '',
                  writer = writer, ifseq = cur.seq, cond = cond }
            if cur.state == 'j' then
              -- Found through the worker's set if the worker dies.
              blocked[writer] = blocked[writer] or {}
              tinsert(blocked[writer], key)
            end
          else
            e = { seq = seq, first = seq, since = now, op = op, state = 'r', job = '', writer = '', cond = cond }
            coalesced = 1
          end
        end
        count_state(e, 1, key)
        index_latest(key, e, 1)
        if e.state == 'r' then set_ready(key, e, true) end
        -- A grant over a revoke owes it; waiting for the revoke's write
        -- (or an owing grant's), it owes it unless that write lands.
        -- Ops folded into this one are not written on their own (what the
        -- application said last is what gets written): with it refused,
        -- the tuple is revoked, erring towards deny.
        -- Nor does folding settle a revoke given up before (a current
        -- letter): only a write that lands does (supersede_letters), so a
        -- newer grant refused for good pends that revoke again (finish).
        if op == 'g' and revokes(key, cur) then
          local behind = e.state == 'b' and e.ifseq == cur.seq
          local before = cur.op == 'g' and debt_of(key, cur) or ''
          owe(key, seq, behind and cur.seq or (before ~= '' and ssub(before, 2)) or nil)
        else
          owes_nothing(key)
        end
      end
      put(key, e)
      local rel = rel_of(key)
      if rel then rels[rel] = true end
      acked = acked + 1
      coalesced_total = coalesced_total + coalesced
      out[2 * i + 1] = seq
      out[2 * i + 2] = coalesced
    end
  end
  if acked > 0 then incr(P .. ':stats', 'acknowledged', acked) end
  if coalesced_total > 0 then incr(P .. ':stats', 'coalesced', coalesced_total) end
  -- The writer's own count, in the same call as its ops (see heartbeat).
  local pusher = ARGV[6 + 3 * n] or ''
  if pusher ~= '' and acked > 0 then incr(P .. ':acks', pusher, acked) end
  bump_gen(rels)
  -- Every key written below, before the first write (see want): a member
  -- left in a relation's index by an aborted call would count as a
  -- pending revoke for good.
  for z, _ in pairs(adds) do want(z, 'zset') end
  for runner, _ in pairs(blocked) do want(P .. ':w:' .. runner, 'set') end
  want_collected()
  -- Before the entries (see apply_writes); members of keys met once, so
  -- no collected write in `zsets` touches them.
  for z, a in pairs(adds) do
    in_parts(rcall, 'ZADD', z, a, #a)
  end
  -- Before the entries: a stray member is harmless, as reclaim looks at
  -- an entry's own writer.
  for runner, keys in pairs(blocked) do in_parts(rcall, 'SADD', P .. ':w:' .. runner, keys, #keys) end
  apply_writes()
  -- Its caller may wait for room (overflow "block"): writes say when
  -- they make some.
  if refused then rcall('SET', P .. ':roomwait', now, 'PX', 2000) end
  local c = rcall('HMGET', K_COUNTS, 'pg', 'pr')
  out[2 * n + 1] = pending_count(c[1], 'g') + pending_count(c[2], 'r')
  out[2 * n + 2] = corrupt
  if call ~= '' then keep_answer(K_PUSHED, call, table.concat(out, ','), oldest) end
  return out
end

-- Ready keys of `kinds` with first <= up_to, oldest first, at most `max`.
local function ready_keys(kinds, up_to, max)
  local keys = {}
  for i = 1, #kinds do
    local room = max - #keys
    if room <= 0 then break end
    local kind = ssub(kinds, i, i)
    local found = rcall('ZRANGEBYSCORE', K_READY[kind], '-inf', up_to, 'LIMIT', 0, room)
    if #keys == 0 then
      keys = found
    else
      local n = #keys
      for j = 1, #found do keys[n + j] = found[j] end
    end
  end
  return keys
end

-- take pub now max kinds up_to writer lease_ms had hold_ms -> {corrupt, term, (key, seq, op, cond, first)*}
-- The writer's lease is renewed; what it takes is being written by it, in
-- `term` (see renew).
if cmd == 'take' then
  local now, max, kinds, up_to, writer, lease =
    tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
  -- Renewed first: a writer that is taking is alive, and must not hand
  -- what it is writing back to itself (it would write it twice).
  local _, term = renew(writer, now, lease, ARGV[9], ARGV[10])
  reclaim(now)
  local keys = ready_keys(kinds, up_to, max)
  local raw = read_raw(keys)
  local out = { 0, term }
  local taken, n, seen = {}, 0, {}
  -- A ready entry is "seq|first|since|op|r||||cond"; taken, it is
  -- "seq|first|since|op|t||writer||cond" (as `move` would write it).
  local as_taken = 't||' .. writer .. '||'
  for i, key in ipairs(keys) do
    local head, seq, first, since, op, cond
    if cache[key] == nil and not seen[key] then
      head, seq, first, since, op, cond = smatch(raw[i] or '', '^((%d+)|(%d+)|(%d+)|([gr])|)r||||(.*)$')
      -- Too long for 64 bits: not fga-wb's (see parse).
      if head and (#seq > 18 or #first > 18 or #since > 18) then head, seq = nil, nil end
    end
    local e
    if head then
      incr(K_COUNTS, F_PENDING[op], -1)
      incr(K_COUNTS, 't', 1)
      zset(K_READY[op], key, false)
      hset(K_OPS, key, head .. as_taken .. cond)
    elseif not seen[key] then
      if cache[key] == nil then out[1] = out[1] + admit(key, raw[i]) end
      e = cache[key]
      if e and e.state == 'r' then
        move(key, e, 't', writer)
        seq, op, cond, first = e.seq, e.op, e.cond, e.first
      end
    end
    if seq then
      taken[n + 1] = key
      local o = 5 * n + 2
      out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] = key, seq, op, cond, first
      n = n + 1
    elseif not head then
      -- Not ready after all (or listed twice): out of the ready sets.
      for _, kind in ipairs({ 'g', 'r' }) do zset(P .. ':ready:' .. kind, key, false) end
    end
    seen[key] = true
  end
  -- Before the entries: ops taken but in no writer's set would never be
  -- reclaimed if this call failed between the two (a stray member is
  -- harmless: reclaim looks at an entry's own writer). And no write at all
  -- before every key is known to be of its type: a key taken out of the
  -- ready set and left pending would never be written.
  want(P .. ':w:' .. writer, 'set')
  want_collected()
  in_parts(rcall, 'SADD', P .. ':w:' .. writer, taken, n)
  apply_writes()
  return out
end

-- Stores job `id` holding the `h` ops listed (of the `n` the caller sent,
-- with its JSON `template`) and queues it.
local function store_job(id, n, h, template, store, model, now, hkeys, hseqs, hops, hconds)
  local json, claims
  if h == n and template and ssub(template, 1, 8) == '{"id":0,' then
    json = '{"id":' .. id .. ',' .. ssub(template, 9)
    claims = table.concat(ARGV, '\n', 8, 7 + 2 * n)
  else
    local ops, pairs_ = {}, {}
    for i = 1, h do
      ops[i] = { key = hkeys[i], op = hops[i], seq = tonumber(hseqs[i]), cond = hconds[i] }
      pairs_[2 * i - 1], pairs_[2 * i] = hkeys[i], hseqs[i]
    end
    json = cjson.encode({
      id = id, store_id = store, model_id = model, attempt = 0, ops = ops, created = now })
    claims = table.concat(pairs_, '\n')
  end
  rcall('HSET', P .. ':jobs', id, json)
  rcall('HSET', P .. ':jobc', id, claims)
  in_parts(rcall, 'SADD', P .. ':jk:' .. id, hkeys, h)
  rcall('ZADD', P .. ':jobq', now, id)
end

-- enqueue pub now writer store model n (key seq)*n template -> job id (0: nothing held)
-- Hands ops this writer took to a new job: they are held by it until a
-- worker writes them, and a newer op supersedes them meanwhile.
-- `template` is the job's JSON as the caller built it from what it took,
-- starting `{"id":0,`: stored with the id when every op is still this
-- writer's (the usual case), so no op is decoded or encoded here. Besides
-- the JSON, P:jobc keeps "key\nseq\n..." of the job's ops, for fetch to
-- claim them without decoding the JSON either.
if cmd == 'enqueue' then
  local now, writer, store, model, n = tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
  local template = ARGV[8 + 2 * n]
  local keys, seqs = {}, {}
  for i = 0, n - 1 do
    keys[i + 1] = ARGV[8 + i * 2]
    seqs[i + 1] = ARGV[9 + i * 2]
  end
  local bad = check_keys({})
  if bad then return redis.error_reply(bad) end
  local raw = read_raw(keys)
  local id = next_of(P .. ':jobseq')
  -- The held ops, in order, as parallel lists (no table per op).
  local hkeys, hseqs, hops, hconds, h = {}, {}, {}, {}, 0
  local superseded, seen = 0, {}
  -- Keys that leave this writer's set: those moved here, and those whose
  -- entry no longer names it. One it took again since (a call that reached
  -- Redis late, after its lease ended and it took the key anew) stays, or
  -- reclaim would never hand it back should the writer die.
  local gone, g = {}, 0
  -- The lowest place in line among the held ops (P:jobmin).
  local minfirst
  local function held_first(first)
    local f = tonumber(first)
    if f and (not minfirst or f < minfirst) then minfirst = f end
  end
  -- Taken by this writer, an entry is "seq|first|since|op|t||writer||cond";
  -- held by the job, "seq|first|since|op|j|id|||cond" (as `move` writes).
  local as_held = 'j|' .. id .. '|||'
  for i, key in ipairs(keys) do
    if not seen[key] then
      seen[key] = true
      local seq, mid, first, op, w, cond =
        smatch(raw[i] or '', '^(%d+)|((%d+)|%d+|([gr])|)t||([^|]*)||(.*)$')
      if seq == seqs[i] and w == writer then
        held_first(first)
        incr(K_COUNTS, 't', -1)
        incr(K_COUNTS, 'j', 1)
        hset(K_OPS, key, seq .. '|' .. mid .. as_held .. cond)
        h = h + 1
        hkeys[h], hseqs[h], hops[h], hconds[h] = key, seq, op, cond
        g = g + 1
        gone[g] = key
      else
        if cache[key] == nil then admit(key, raw[i]) end
        local e = cache[key]
        if e and e.state == 't' and e.writer == writer and e.seq == seqs[i] then
          held_first(e.first)
          move(key, e, 'j', nil, sformat('%.0f', id))
          h = h + 1
          hkeys[h], hseqs[h], hops[h], hconds[h] = key, e.seq, e.op, e.cond
        elseif e and e.state == 'b' and e.writer == writer and e.ifseq == seqs[i] then
          -- A newer op arrived since the take: it is ready now, and the taken
          -- op (of a kind the entry no longer says) is folded into it.
          move(key, e, 'r')
          superseded = superseded + 1
        end
        -- Still this writer's in some state (taken again since): not this
        -- call's to release.
        local still = e and (e.state == 't' or e.state == 'b') and e.writer == writer
        if not still then
          g = g + 1
          gone[g] = key
        end
      end
    end
  end
  if superseded > 0 then incr(P .. ':stats', 'coalesced', superseded) end
  -- The job before its ops' entries: a call that fails between the two
  -- leaves a job whose ops it does not hold (its worker finds them busy
  -- until this writer gives them back or its lease ends, then stale),
  -- never ops held by a job that does not exist.
  if h > 0 then
    store_job(id, n, h, template, store, model, now, hkeys, hseqs, hops, hconds)
    if minfirst then pcall_('ZADD', K_JOBMIN, minfirst, id) end
  end
  apply_writes()
  -- The newer ops are ready now; the processes that pushed them take them.
  if superseded > 0 then publish('finished') end
  in_parts(rcall, 'SREM', P .. ':w:' .. writer, gone, g)
  if h == 0 then return 0 end
  publish('jobs')
  return id
end


-- A job that cannot be read: set aside (P:badjobs), and the ops it held are
-- pending again, so nothing is lost with it.
local function drop_bad_job(id, raw, now)
  local keys = rcall('SMEMBERS', P .. ':jk:' .. id)
  load(keys)
  for _, key in ipairs(keys) do
    local e = cache[key]
    if e and (e.state == 'j' or e.state == 't') and e.job == id then move(key, e, 'r') end
  end
  incr(P .. ':stats', 'bad_jobs', 1)
  apply_writes()
  rcall('DEL', P .. ':jk:' .. id)
  rcall('HDEL', P .. ':jobs', id)
  rcall('HDEL', P .. ':jobc', id)
  rcall('HDEL', P .. ':jobrun', id)
  rcall('ZREM', P .. ':jobq', id)
  pcall_('ZREM', K_JOBMIN, id)
  rcall('HSET', P .. ':badjobs', id, ssub(raw or '', 1, 2000))
  return #keys
end

-- A worker's claim to write a job's ops: only ops still held by that job.
-- Returns one status per op: 1 claimed, 0 stale, 2 busy.
-- A claimed op stays in state j: the job's entry in P:jobrun is what says it
-- is being written (push then blocks a newer op behind it), so a claim
-- rewrites no entry and a job's end has no writer set to clean.
local function claim_ops(worker, job, keys, seqs)
  local raw = read_raw(keys)
  local out = {}
  for i, key in ipairs(keys) do
    local seq, state, ejob, w
    local e = cache[key]
    if e == nil then
      -- Only what a claim compares; `parse` accepts the same entries.
      seq, state, ejob, w = smatch(raw[i] or '', '^(%d+)|%d+|%d+|[gr]|([rjtb])|([^|]*)|([^|]*)|%d*|')
      if not seq and raw[i] then
        -- Unreadable: `admit` drops it and mends the indexes.
        admit(key, raw[i])
        e = cache[key]
      end
    end
    if e then seq, state, ejob, w = e.seq, e.state, e.job, e.writer end
    if not seq or seq ~= seqs[i] then
      out[i] = 0
    elseif state == 'j' and ejob == job then
      out[i] = 1
    elseif state == 't' and w ~= worker then
      -- Its write by a worker presumed dead has not been reclaimed yet.
      out[i] = 2
    else
      out[i] = 0
    end
  end
  return out
end

-- fetch pub now worker lease_ms max had hold_ms -> {bad, term, (job id, job json, claims)*}
-- Due jobs for a worker, their ops claimed for it (claims: one digit per op
-- as claim_ops says); its lease is renewed. `bad`: jobs that could not be
-- read, set aside (their ops pending again).
if cmd == 'fetch' then
  local now, worker, lease, max = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  -- Renewed first, as in take: its own running jobs stay its own.
  local _, term = renew(worker, now, lease, ARGV[7], ARGV[8])
  reclaim(now)
  apply_writes()
  local out, back = { 0, term }, 0
  for _, id in ipairs(rcall('ZRANGEBYSCORE', P .. ':jobq', '-inf', now, 'LIMIT', 0, max)) do
    local job = rcall('HGET', P .. ':jobs', id)
    local keys, seqs = job_ops(id, job)
    if job and keys then
      -- Off the queue last: a call that fails before leaves the job queued
      -- (a stray member of the worker's set is harmless: reclaim looks at
      -- P:jobrun), never in neither place.
      rcall('SADD', P .. ':wj:' .. worker, id)
      rcall('HSET', P .. ':jobrun', id, worker)
      rcall('ZREM', P .. ':jobq', id)
      -- The id as stored: a job the worker cannot decode is set aside by
      -- it, whatever its JSON says.
      tinsert(out, id)
      tinsert(out, job)
      tinsert(out, table.concat(claim_ops(worker, id, keys, seqs)))
    elseif job then
      back = back + drop_bad_job(id, job, now)
      out[1] = out[1] + 1
    else
      rcall('ZREM', P .. ':jobq', id)
    end
  end
  -- Repairs admit collected while claiming.
  apply_writes()
  -- Their ops are ready again: flushers take them.
  if back > 0 then publish('finished') end
  return out
end

-- finish pub now writer job action due jobjson n (key seq outcome reason code attempts)*n
--        [call oldest term]
--   outcome: a(pplied) d(ead) r(etry: ready again) k(eep: back to its job)
--            s(tale: superseded, not written) n(ot ours: another writer
--            holds the key)
--   action (with job): '' nothing, 'done' delete the job, 'retry' store
--   jobjson and run it at `due`
--   call: the writer's id for this finish. A writer whose call failed (its
--   reply may be lost after the call ran) repeats it with the same id, and
--   the repeat answers what the call did instead of doing it again: ops it
--   made ready may have been taken again since. P:fin:<writer> keeps the
--   answers of the writer's calls from `oldest` (its oldest unanswered) on.
--   term: the writer's term when it first built the call (a job's: when it
--   fetched the job), the same in every repeat. From an earlier term
--   (what it held was handed to others since), the call ends nothing the
--   writer holds now: that is a write of the new term.
--   -> {applied, dead, requeued, superseded[, revokes pending again (see
--       below), when some are]}
if cmd == 'finish' then
  local now, writer, job, action, due, jobjson, n =
    tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
  local tail = 10 + n * 6
  local call, oldest, term = ARGV[tail] or '', ARGV[tail + 1] or '', ARGV[tail + 2] or ''
  local K_FIN = P .. ':fin:' .. writer
  if call ~= '' then
    local a, d, r, s, p = smatch(answer_kept(K_FIN, call) or '', '^(%d+)|(%d+)|(%d+)|(%d+)|?(%d*)$')
    if a and (tonumber(p) or 0) > 0 then
      return { tonumber(a), tonumber(d), tonumber(r), tonumber(s), tonumber(p) }
    end
    if a then return { tonumber(a), tonumber(d), tonumber(r), tonumber(s) } end
  end
  -- Without a term (an older caller) the call is taken as this term's.
  local fresh = term == '' or rcall('HGET', P .. ':terms', writer) == term
  -- A job's ops are this call's only while this writer runs the job: once
  -- its lease ended the job went back to the queue, and another worker may
  -- be writing them.
  local own_job = job ~= '' and fresh and rcall('HGET', P .. ':jobrun', job) == writer
  local keys = {}
  for i = 0, n - 1 do keys[i + 1] = ARGV[10 + i * 6] end
  local raw = read_raw(keys)
  local applied, dead, requeued, superseded = 0, 0, 0, 0
  local transient, repended = 0, 0
  local rels, mine, written, wseqs, letters = {}, {}, {}, {}, {}
  -- Others need to hear of this only if a check may wait for it (a revoke,
  -- a grant with a condition), an op waited behind it or is ready again,
  -- or a caller waits for room (below). Not for every job: each message
  -- wakes every process.
  local notify = false
  for i = 0, n - 1 do
    local b = 10 + i * 6
    local key, seq, outcome = ARGV[b], ARGV[b + 1], ARGV[b + 2]
    local reason, code, attempts = ARGV[b + 3], ARGV[b + 4], tonumber(ARGV[b + 5])
    local e = cache[key]
    -- Applied ops of this writer (state t) or of this job (state j), the
    -- usual case, are dropped from their raw entries (see read_raw).
    local light = false
    if e == nil and outcome == 'a' then
      local eseq, op, state, ejob, w, cond =
        smatch(raw[i + 1] or '', '^(%d+)|%d+|%d+|([gr])|([tj])|([^|]*)|([^|]*)||(.*)$')
      if eseq == seq and ((state == 't' and ejob == '' and w == writer and fresh) or
                          (state == 'j' and ejob == job and w == '' and own_job)) then
        light = true
        applied = applied + 1
        tinsert(written, key)
        tinsert(wseqs, seq)
        if state == 't' then tinsert(mine, key) end
        if op == 'r' or cond ~= '' then notify = true end
        incr(K_COUNTS, state, -1)
        local rel = rel_of(key)
        if rel then
          incr(K_REL, rel_field(rel, op), -1)
          zset(lex_key(rel, op), key, false)
        end
        put(key, nil)
        owes_nothing(key)
      end
    end
    if not light then
      if e == nil then
        admit(key, raw[i + 1])
        e = cache[key]
      end
      local writing = fresh and e and e.state == 't' and e.seq == seq and e.writer == writer
      local behind = fresh and e and e.state == 'b' and e.ifseq == seq and e.writer == writer
      local held = own_job and e and e.state == 'j' and e.seq == seq and e.job == job
      -- 'n': not this writer's to finish, even when it holds the key (it
      -- may hold it again, in a new term): its set keeps the key.
      if (writing or behind) and outcome ~= 'n' then tinsert(mine, key) end
      if behind or (e and (e.op == 'r' or e.cond ~= '')) then notify = true end
      local reclaimed = e and e.state == 'r' and e.seq == seq
      if outcome == 'a' then
        -- A grant pushed while this op was written owed its revoke unless
        -- this write landed: it did, whoever holds the key now.
        if e and e.op == 'g' and e.seq ~= seq and debt_of(key, e) == '|' .. seq then
          owes_nothing(key)
        end
        -- The write landed whoever holds the key now, but the op counts
        -- once: here if it is still this writer's, or was handed back
        -- (its lease ended) and not taken again; otherwise it was taken
        -- again, folded into a newer op, or cleared, and counts there.
        tinsert(written, key)
        tinsert(wseqs, seq)
        if writing or held or reclaimed then
          applied = applied + 1
          drop(key, e)
        elseif behind then
          applied = applied + 1
          move(key, e, 'r')
        end
      elseif (outcome == 'd' or outcome == 'D') and (writing or held) then
        dead = dead + 1
        -- Before drop forgets it.
        local owes = e.op == 'g' and revokes(key, e)
        drop(key, e)
        -- Written once every key is known to be of its type (below).
        letters[#letters + 1] = { key = key, e = e, reason = reason, code = code,
                                  attempts = attempts, transient = outcome == 'D' }
        if outcome == 'D' then transient = transient + 1 end
        -- Refused for good, this op never reaches OpenFGA: a revoke of the
        -- key that died in an outage before it is owed again, not
        -- superseded (OpenFGA may still hold what it revokes, and checks
        -- would answer from that). Pending again, as a replay would put it;
        -- its letter goes below.
        local owed, owed_id = nil, nil
        if outcome == 'd' then owed, owed_id = owed_revoke(key) end
        -- So is a revoke this grant was pushed over before it reached
        -- OpenFGA (see P:owes), or one a grant given up before it owed (its
        -- letter says so): with every acknowledged op applied in order,
        -- the tuple is gone. Pending again in this grant's place.
        -- Given up too, a grant owes a revoke whose letter is current: its
        -- own letter replaces that one as the key's newest, and a replay
        -- or a newer grant refused for good must still find the debt.
        local owing = e.op == 'g' and (owes or owing_letter(key)
          or (outcome == 'D' and owed_revoke(key) ~= nil))
        if not owed and outcome == 'd' and owing then
          owed = { key = key, op = 'r', cond = '', first = e.first, since = e.since }
        end
        -- Given up (transient), its letter keeps the debt (its own, or the
        -- one the letter it replaces kept): a replay owes it again, and so
        -- does a newer op refused for good.
        if owing and outcome == 'D' then letters[#letters].owes = true end
        if owed then
          rebuffer(owed, ARGV[3])
          letters[#letters].owed = owed_id
          -- Numbered after that revoke: its write leaves the letter
          -- current (replayable), as a newer op's would not.
          letters[#letters].seq = next_of(P .. ':seq')
          repended = repended + 1
          notify = true
        end
        local rel = rel_of(key)
        if rel then rels[rel] = true end
      elseif outcome == 'r' and writing then
        requeued = requeued + 1
        move(key, e, 'r')
        -- Ready again: other processes' flushers take it.
        notify = true
      elseif outcome == 'k' and writing and own_job then
        requeued = requeued + 1
        move(key, e, 'j', nil, job)
      elseif outcome == 'k' and held then
        -- Still with its job.
      elseif outcome == 's' and (writing or behind) then
        -- Found superseded when claimed, yet still this writer's (a job its
        -- own replay stored before failing): it is the key's newest op, or
        -- one waits behind it, so the key is ready again. Left held, it
        -- stayed in flight until the writer went (out of the writer's set,
        -- for good).
        requeued = requeued + 1
        move(key, e, 'r')
        notify = true
      elseif outcome == 'n' or outcome == 's' then
        -- Not this writer's to finish (another writer holds the key), or found
        -- superseded when claimed (counted when it was superseded).
      elseif behind then
        -- A newer op waited behind it: that op counts, this one (which may
        -- have been a grant) is folded into it.
        superseded = superseded + 1
        move(key, e, 'r')
      end
      -- Otherwise its writer's lease ended and the op was handed back: it
      -- counts where it ends (applied by another writer, folded into a
      -- newer op by a push or by reclaim, or cleared), not here.
    end
  end
  if applied > 0 then incr(P .. ':stats', 'applied', applied) end
  if dead > 0 then incr(P .. ':stats', 'dead_lettered', dead) end
  -- Counted as a replay counts them.
  if repended > 0 then incr(P .. ':stats', 'acknowledged', repended) end
  -- Workers list the letters for transient ones only when this has moved.
  if transient > 0 then incr(P .. ':stats', 'dead_transient', transient) end
  if superseded > 0 then incr(P .. ':stats', 'coalesced', superseded) end
  bump_gen(rels)
  -- No write before every key written is known to be of its type (see
  -- want): an aborted finish would leave letters of ops still taken, and
  -- its repeat would write them again.
  want_collected()
  want(P .. ':w:' .. writer, 'set')
  if #letters > 0 then
    want(K_DEAD, 'hash')
    want(K_DEADKEY, 'hash')
  end
  if own_job then
    for _, h in ipairs({ ':jobs', ':jobc', ':jobrun' }) do want(P .. h, 'hash') end
    want(P .. ':jobq', 'zset')
    want(P .. ':wj:' .. writer, 'set')
  end
  for _, l in ipairs(letters) do
    local e = l.e
    local id = next_of(P .. ':deadseq')
    -- With its place in line (`first`) and when it became pending
    -- (`since`): a replay puts it back there (see replay).
    rcall('HSET', K_DEAD, id, cjson.encode({
      id = id, key = l.key, op = e.op, seq = l.seq or tonumber(e.seq), owes = l.owes, reason = l.reason, code = l.code,
      attempts = l.attempts, dead_at = math.floor(now / 1000), cond = e.cond,
      transient = l.transient, first = tonumber(e.first), since = tonumber(e.since) }))
    rcall('HSET', K_DEADKEY, l.key, id)
    if l.owed then rcall('HDEL', K_DEAD, l.owed) end
    local plain = e.op == 'g' and e.cond == ''
    index_dead_for_checks(l.key, l.transient and (plain and K_DEADGR or K_DEADREV) or nil)
    index_dead_current(l.key, l.transient and e.first or nil)
  end
  apply_writes()
  in_parts(rcall, 'SREM', P .. ':w:' .. writer, mine, #mine)
  if own_job and action == 'done' then
    rcall('DEL', P .. ':jk:' .. job)
    rcall('HDEL', P .. ':jobs', job)
    rcall('HDEL', P .. ':jobc', job)
    rcall('HDEL', P .. ':jobrun', job)
    rcall('ZREM', P .. ':jobq', job)
    pcall_('ZREM', K_JOBMIN, job)
    rcall('SREM', P .. ':wj:' .. writer, job)
  elseif own_job and action == 'retry' then
    rcall('HSET', P .. ':jobs', job, jobjson)
    -- Its ops may be fewer now: fetch decodes the new JSON.
    rcall('HDEL', P .. ':jobc', job)
    -- Queued before it stops running: never in neither place.
    rcall('ZADD', P .. ':jobq', due, job)
    rcall('HDEL', P .. ':jobrun', job)
    rcall('SREM', P .. ':wj:' .. writer, job)
  end
  if #written > 0 then
    note_written(written)
    -- After the call's writes: a letter index of another type must not
    -- abort it (its repeat would find its ops gone and count none).
    pcall(supersede_letters, written, wseqs)
    forget_replays(written)
  end
  if not notify and applied + dead > 0 and rcall('EXISTS', P .. ':roomwait') == 1 then
    notify = true
  end
  if notify then publish('finished') end
  if call ~= '' then
    keep_answer(K_FIN, call, applied .. '|' .. dead .. '|' .. requeued .. '|' .. superseded ..
      (repended > 0 and ('|' .. repended) or ''), oldest)
  end
  if repended > 0 then return { applied, dead, requeued, superseded, repended } end
  return { applied, dead, requeued, superseded }
end

-- confirmed pub now since writer lease_ms -> {waiting, until when at most, loss open}
-- Writers other than `writer` that have not run a heartbeat since `since`
-- (when `writer` reconnected), and so have not compared what they
-- acknowledged with what Redis holds: those whose lease runs, and those
-- whose last heartbeat is less than three leases before `since`. A failover
-- to a replica that lagged brings back an older lease end and heartbeat with
-- the rest, so a live writer can look dead; it gets until two leases after
-- `since` to look. A writer that stopped cleanly (release) has no heartbeat
-- left and is not waited for. `loss open` is read in the same run: the
-- heartbeat that confirms a writer also records the loss it found, and a
-- caller that read the loss flag before that heartbeat must not go on from
-- this confirmation alone.
if cmd == 'confirmed' then
  local now, since, me = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local lease = tonumber(ARGV[6]) or 0
  local waiting, latest = 0, 0
  local function wait_for(until_ms)
    if now < until_ms then
      waiting = waiting + 1
      if until_ms > latest then latest = until_ms end
    end
  end
  local ends_of = {}
  local owners = rcall('ZRANGE', P .. ':owners', 0, -1, 'WITHSCORES')
  for i = 1, #owners, 2 do ends_of[owners[i]] = tonumber(owners[i + 1]) or 0 end
  -- A writer whose keys reclaim keeps past its lease is gone: its lease
  -- ended when reclaim found it.
  local over = pcall_('HGETALL', P .. ':heldover')
  if type(over) ~= 'table' or over.err then over = {} end
  for i = 1, #over, 2 do
    if ends_of[over[i]] then ends_of[over[i]] = tonumber(over[i + 1]) or 0 end
  end
  local beats = rcall('HGETALL', P .. ':beats')
  for i = 1, #beats, 2 do
    local w, beat = beats[i], tonumber(beats[i + 1]) or 0
    if w ~= me and beat < since and beat > since - 3 * lease then
      wait_for(math.max(ends_of[w] or 0, since + 2 * lease))
      ends_of[w] = nil
    elseif beat >= since then
      ends_of[w] = nil
    end
    -- Else its last heartbeat is old, yet its lease may run (a longer
    -- lease of its own, or one kept for a hold): waited for below while
    -- it does.
  end
  -- Writers with a lease and no heartbeat on record.
  for w, ends in pairs(ends_of) do
    if w ~= me then wait_for(ends) end
  end
  return { waiting, latest, rcall('EXISTS', P .. ':loss') }
end

-- heartbeat pub now writer lease_ms epoch acked had hold_ms pushed recent may_count [beat]
--   -> {alive, epoch, seq, loss open, lost now, term, recounting}
-- Renews the writer's lease (alive is 0 if it had already ended; a new
-- `term` says what it held was handed to others), and compares what the writer knows
-- with what Redis holds: `epoch` is the store's epoch as the writer last saw
-- it ('' before its first look), `acked` the highest sequence number it
-- acknowledged under that epoch, `pushed` how many ops its pushes had
-- accepted in all, `recent` 1 if its last heartbeat succeeded a short
-- while ago, `may_count` `pushed` and the ops of its push calls whose
-- replies it had not read (what it may count once they are in). A
-- `recounting` of 1 asks the writer for its next heartbeat at once (its
-- count was set aside, see below; `beat` numbers the writer's heartbeats,
-- so that one a Redis Cluster client sent again is known). Keys gone, an epoch never seen, the sequence counter below
-- `acked`, or the writer's own count (P:acks) below `pushed` prove that
-- Redis lost acknowledged ops (a
-- restart without its data, a failover to a replica that had not received
-- them). The loss is recorded in P:loss, which stays until an operator
-- acknowledges it, and the store moves to a new epoch. A writer that finds
-- an epoch that replaced its own after a recorded loss just moves on to it.
-- How far the counters jump when a loss is recorded: 2^32, far more than a
-- lost stretch of history holds, and small enough that a store records
-- some 23,000 losses before its numbers reach 10^14, past which Lua and
-- cjson write them with an exponent.
local LOSS_GAP = 4294967296
if cmd == 'heartbeat' then
  local now, writer, lease = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  local known, acked = ARGV[6] or '', tonumber(ARGV[7]) or 0
  -- How many ops this writer's pushes had accepted, and what Redis counts
  -- for it: any other writer's push raises P:seq back above `acked` after
  -- a failover to a lagging replica, but not this.
  local pushed = tonumber(ARGV[10]) or 0
  -- Unknown for a writer gone for long, whose count went with its
  -- heartbeat, even if a push of its since started a new one (`since`);
  -- and after the count fell behind the writer's (a loss, or an epoch
  -- another writer moved on), when it was set aside to be counted again
  -- here (`recount`). Counted again from what the writer may count
  -- (ARGV[12]: `pushed` and the ops of its pushes whose replies it had not
  -- read when this heartbeat set out) and what Redis counted since the
  -- count was dropped (pushes that ran after those reads included): a
  -- count above the writer's only weakens this check, one below would
  -- record a loss that never was. But one whose heartbeat is still here,
  -- or that ran one a short while ago (ARGV[11]), cannot have lost it so:
  -- a count missing then went with the ops it counted.
  local have = pcall_('HGET', P .. ':acks', writer)
  local recount = 'recount:' .. writer
  local since, recounting = 0, 0
  -- The heartbeat that set the count aside, sent again by a Redis Cluster
  -- client after its reply was lost: counted again from its reads, the
  -- count would miss a push that ran between them and the first run, and
  -- the next heartbeat would record a loss that never was. The next one
  -- counts it, from its own reads, as it would have.
  local beat = ARGV[13] or ''
  local flag = pcall_('HGET', P .. ':acks', recount)
  local again = beat ~= '' and flag == beat
  if type(flag) == 'string'
      or (ARGV[11] ~= '1' and rcall('HEXISTS', P .. ':beats', writer) == 0) then
    since = as_count(have) or 0
    have = nil
  elseif have == false then
    have = '0'
  end
  -- One fga-wb did not write ("nan" compares false with anything) is
  -- counted again, as a missing one.
  have = as_count(have)
  -- Every key a loss writes too: one that failed halfway would have moved
  -- the epoch on with no loss recorded, and the next heartbeat would take
  -- the new epoch for a recorded loss.
  local bad = expect_types({ { P .. ':owners', 'zset' }, { P .. ':loss', 'hash' },
                             { P .. ':epochs', 'hash' }, { P .. ':epoch', 'string' },
                             { P .. ':holdfor', 'hash' }, { P .. ':heldover', 'hash' },
                             { P .. ':jobseq', 'string' }, { P .. ':deadseq', 'string' },
                             { P .. ':stats', 'hash' } })
  if bad then return redis.error_reply(bad) end
  local ends, term = renew(writer, now, lease, ARGV[8], ARGV[9])
  rcall('HSET', P .. ':beats', writer, now)
  -- Heartbeats of writers gone for long (kept for confirmed until then).
  local beats = rcall('HGETALL', P .. ':beats')
  for i = 1, #beats, 2 do
    -- Not a writer whose lease (or hold past it) still runs: a long lease
    -- and hold can outlast its last heartbeat by more than that.
    -- Nor one that still holds keys or jobs: whoever takes them back reads
    -- its hold (a lease of ten minutes or more can end after its last
    -- heartbeat is that old, and before anyone has looked).
    if (tonumber(beats[i + 1]) or 0) < now - BEATS_KEEP_MS
        and (tonumber(rcall('ZSCORE', P .. ':owners', beats[i])) or 0) < now
        and rcall('EXISTS', P .. ':w:' .. beats[i], P .. ':wj:' .. beats[i]) == 0 then
      rcall('HDEL', P .. ':beats', beats[i])
      rcall('HDEL', P .. ':terms', beats[i])
      rcall('HDEL', P .. ':holdfor', beats[i])
      pcall_('HDEL', P .. ':acks', beats[i], 'recount:' .. beats[i])
      -- A mark an older version's reclaim left behind.
      rcall('HDEL', P .. ':heldover', beats[i])
    end
  end
  -- Write marks past their use go even when nothing is being written.
  pcall_('ZREMRANGEBYSCORE', P .. ':wobj', '-inf', redis_ms() - WRITTEN_KEEP_MS)
  local alive = 1
  if ends and ends < now then alive = 0 end
  local epoch = rcall('GET', P .. ':epoch')
  local seq_text = rcall('GET', P .. ':seq') or '0'
  local seq = tonumber(seq_text) or 0
  local why
  -- A process that acknowledged ops before it knew the epoch (its first
  -- heartbeat failed) still compares its counter.
  if known ~= '' or acked > 0 then
    if not epoch then
      why = 'its keys are gone (a restart without its data, a FLUSHALL, or eviction); ' ..
        'this process had acknowledged ops up to sequence number ' .. acked
    elseif known ~= '' and epoch ~= known and rcall('HEXISTS', P .. ':epochs', known) == 0 then
      why = 'the store\'s epoch changed from ' .. known .. ' to ' .. epoch ..
        ' without a recorded loss (data restored from elsewhere, or a loss record that was itself lost)'
    elseif (known == '' or epoch == known) and seq < acked then
      why = 'its sequence counter went back from ' .. acked .. ' to ' .. seq_text ..
        ' (a failover to a replica that had not received them, or a restart from an older snapshot)'
    elseif (known == '' or epoch == known) and have and have < pushed then
      why = 'it holds ' .. have .. ' of the ' .. pushed .. ' ops this process acknowledged' ..
        ' (a failover to a replica that had not received them, or a restart from an older snapshot)'
    end
  end
  -- Accounted for: recorded below, or by whoever moved the epoch on. The
  -- count is dropped and counted again from the next heartbeat's own
  -- reads: set from this one's, a push that ran in between would be
  -- missing from it, and the next heartbeat would record a loss again.
  -- The writer sends that heartbeat at once (`recounting`): what both
  -- count stays a round trip's pushes, and the comparison it skips is
  -- skipped for no longer.
  if again then
    recounting = 1
  elseif not have then
    local may_count = math.max(tonumber(ARGV[12]) or 0, pushed)
    if may_count + since > 0 then
      pcall_('HSET', P .. ':acks', writer, sformat('%.0f', may_count + since))
    end
    pcall_('HDEL', P .. ':acks', recount)
  elseif have < pushed then
    pcall_('HDEL', P .. ':acks', writer)
    pcall_('HSET', P .. ':acks', recount, beat ~= '' and beat or 1)
    recounting = 1
  end
  local lost_now = 0
  if why then
    lost_now = 1
    -- First: whatever fails after it, checks fail closed.
    if rcall('EXISTS', P .. ':loss') == 0 then
      rcall('HSET', P .. ':loss', 'at', ARGV[3], 'by', writer, 'reason', why, 'more', 0)
    else
      incr(P .. ':loss', 'more', 1)
    end
    if known ~= '' then rcall('HSET', P .. ':epochs', known, ARGV[3]) end
    if epoch then rcall('HSET', P .. ':epochs', epoch, ARGV[3]) end
    epoch = ARGV[3] .. '/' .. writer
    begin_epoch(epoch)
    -- Numbers Redis handed out before the loss may still be in use (a
    -- writer still writing an op of the lost history, a worker running a
    -- job of it): the next ones start far past any of them, or a finish of
    -- the old op would end a new one that got its number on the same key.
    for _, k in ipairs({ ':seq', ':jobseq', ':deadseq' }) do
      local at = tonumber(rcall('GET', P .. k)) or 0
      if k == ':seq' and acked > at then at = acked end
      if k == ':deadseq' then note_no_letters() end
      rcall('SET', P .. k, sformat('%.0f', at + LOSS_GAP))
    end
    incr(P .. ':stats', 'losses', 1)
    flush_incrs()
    publish('all')
  elseif not epoch then
    epoch = ARGV[3] .. '/' .. writer
    begin_epoch(epoch)
  end
  return { alive, epoch, seq_text, rcall('EXISTS', P .. ':loss'), lost_now, term, recounting }
end

-- gen: what checks compare cached answers against is a script of its own,
-- gen.lua (checks make that call once each, and this script's top level
-- would cost more than the call).

-- loss pub -> {at, by, reason, more} of the open loss record, or {}
-- A loss is open while its key exists (checks test EXISTS): a record
-- without its fields (data fga-wb did not write) is still shown, and
-- acknowledged.
local function loss_fields(...)
  if rcall('EXISTS', P .. ':loss') == 0 then return nil end
  local l = pcall_('HMGET', P .. ':loss', ...)
  if type(l) ~= 'table' or l.err then return {} end
  return l
end
if cmd == 'loss' then
  local l = loss_fields('at', 'by', 'reason', 'more')
  if not l then return {} end
  return { l[1] or '0', l[2] or '', l[3] or 'an unreadable record of a loss', l[4] or '0' }
end

-- ackloss pub now by -> the loss record closed, as `loss` shows it, or {}:
-- an operator has dealt with the loss; checks may answer again. Every
-- cached answer is dropped. The record is read in the same call: what the
-- operator is told was closed is what was (a loss recorded after the
-- operator last looked is in it).
if cmd == 'ackloss' then
  local stamp = ARGV[3] .. ' by ' .. ARGV[4]
  -- This call, sent again by a Redis Cluster client after its reply was
  -- lost: it answers what the first did, and closes no loss recorded
  -- since (nobody has looked at that one). P:lossacks keeps each ack's
  -- answer for 10 min, none included.
  local K_ACKS = P .. ':lossacks'
  local prior = pcall_('HGET', K_ACKS, stamp)
  if type(prior) == 'string' then
    local ok, closed = pcall(cjson.decode, prior)
    if ok and type(closed) == 'table' then return closed end
  end
  local l = loss_fields('at', 'reason', 'by', 'more')
  local function answer(closed)
    pcall_('HSET', K_ACKS, stamp, #closed > 0 and cjson.encode(closed) or '[]')
    pcall_('PEXPIRE', K_ACKS, ANSWERS_KEEP_MS)
    return closed
  end
  if not l then return answer({}) end
  rcall('DEL', P .. ':loss')
  mark_all_written()
  local closed = { l[1] or '0', l[3] or '', l[2] or 'an unreadable record of a loss', l[4] or '0' }
  rcall('HSET', P .. ':stats', 'last_loss', (l[1] or '0') .. ' ' .. (l[2] or ''),
        'last_loss_acknowledged', stamp)
  for _, f in ipairs(rcall('HKEYS', P .. ':gen')) do incr(P .. ':gen', f, 1) end
  incr(P .. ':gen', '*', 1)
  flush_incrs()
  publish('all')
  return answer(closed)
end

-- release pub now writer [until] -> ends a writer's lease now (a clean stop):
-- what it held is ready again. With `until` (ms), a stop that left a Write
-- whose outcome is unknown: its lease is kept to then at least, when that
-- Write can no longer land (as `lease` does), and ends by itself; no Write of
-- its is under way from here on, so reclaim hands what it holds on at once
-- then, not a hold later. One call: a stop whose lease could not be kept
-- keeps its hold record too.
if cmd == 'release' then
  local now, writer = tonumber(ARGV[3]), ARGV[4]
  if ARGV[5] then
    if keep_lease(writer, tonumber(ARGV[5])) then rcall('HDEL', P .. ':holdfor', writer) end
    return 0
  end
  rcall('HDEL', P .. ':holdfor', writer)
  rcall('ZADD', P .. ':owners', 0, writer)
  local n = reclaim(now)
  apply_writes()
  -- Stopped cleanly: nothing of its own left to compare after a reconnect.
  rcall('HDEL', P .. ':beats', writer)
  rcall('HDEL', P .. ':terms', writer)
  pcall_('HDEL', P .. ':acks', writer, 'recount:' .. writer)
  return n
end

-- lease pub writer until -> when the writer's lease ends now (0: it has none)
-- Keeps `writer`'s lease to `until` (ms) at least: a Write of its whose
-- outcome is unknown may commit on the server until then, and what it holds
-- must not go to others meanwhile (they would write a newer op on those keys
-- first), not even when it stops or dies. A lease that ended is kept too
-- while nobody has reclaimed it (nothing went to others yet); once
-- reclaimed it is not brought back: what it held went to others already.
if cmd == 'lease' then
  local writer = ARGV[3]
  local ends = keep_lease(writer, tonumber(ARGV[4]))
  if not ends then return 0 end
  -- Alive, as renew says.
  rcall('HDEL', P .. ':heldover', writer)
  return ends
end

-- strays pub now writer ['keys' key* | 'jobs' id*] -> {ops, jobs}
-- What a live writer holds here without knowing it: ops a take moved to it
-- or a job a fetch handed it whose reply was lost (a dropped connection, a
-- timeout), ops whose finish never got through. While its lease runs,
-- nothing else brings them back. Without keys the caller holds nothing at
-- all now (no take, write or finish of its own under way), so everything
-- this names it as holding goes back, as reclaim hands back a dead
-- writer's; with keys, the ops of those keys, which it does not hold; with
-- jobs (a worker running those), the other jobs it is named as running. The
-- writer keeps its lease and term.
if cmd == 'strays' then
  local now, writer = tonumber(ARGV[3]), ARGV[4]
  local only, running
  if ARGV[5] == 'keys' then
    only = {}
    for i = 6, #ARGV do only[#only + 1] = ARGV[i] end
  elseif ARGV[5] == 'jobs' then
    running = {}
    for i = 6, #ARGV do running[ARGV[i]] = true end
  end
  local list = { { P .. ':w:' .. writer, 'set' }, { P .. ':wj:' .. writer, 'set' } }
  local bad = check_keys(only or {}) or expect_types(list)
  if bad then return redis.error_reply(bad) end
  local ops, folded, jobs
  if running then
    ops, folded, jobs = hand_back_jobs(writer, now, running)
  else
    ops, folded, jobs = hand_back(writer, now, only)
  end
  note_handed_back(ops, folded)
  flush_incrs()
  if jobs > 0 then publish('jobs') end
  return { ops, jobs }
end

-- Whether a clear is under way (see P:clearing), and what is wrong with the
-- key if it holds what fga-wb did not write (the caller refuses to answer).
local function clearing_now()
  local n = pcall_('ZCOUNT', P .. ':clearing', redis_ms(), '+inf')
  if type(n) == 'number' then return n > 0, nil end
  return true, 'fga-wb: Redis key ' .. P .. ':clearing holds something other than a sorted set; ' ..
    'it was not written by fga-wb (remove it, or use another redis.key_prefix)'
end

-- relevant pub limit object user nrels (rel scope)*
--   -> {revokes, grants, written ago (ms, -1: none), dead, (key, cond)*}
-- scope 0: ops on every object count; 1: only ops on `object`; 2: only ops
-- on `object` whose user can be `user` (itself, a wildcard, a userset);
-- plus 4 when a grant of the relation can take the checked access away.
-- dead: transient letters that leave the check in doubt (see P:deadrev). No
-- list when there are revokes or more grants than limit. nrels = 0: every
-- relation, every object.
local SCAN_MAX = 1000
if cmd == 'relevant' then
  local limit, object, user, nrels = tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
  local rels = {}
  if nrels == 0 then
    local seen = {}
    for _, f in ipairs(rcall('HKEYS', P .. ':rel')) do
      local rel = smatch(f, '^(.*)|[gr]$')
      if rel and not seen[rel] then
        seen[rel] = true
        tinsert(rels, { rel, 0 })
      end
    end
  else
    -- A scope of 4 or more: a grant of the relation can take the checked
    -- access away (see `current` below).
    for i = 0, nrels - 1 do
      local s = tonumber(ARGV[8 + i * 2]) or 0
      tinsert(rels, { ARGV[7 + i * 2], s % 4, s >= 4 })
    end
  end
  local lo, hi = '[' .. object .. '#', '[' .. object .. '#\255'
  local from = #object + 2
  local function counts(key)
    local at = string.find(key, '@', from, true)
    if not at then return true end
    local u = ssub(key, at + 1)
    return u == user or ssub(u, -2) == ':*' or string.find(u, '#', 1, true) ~= nil
  end
  local revokes, grants = 0, 0
  -- Grant keys already picked (user-bound scopes), and the scopes whose
  -- grants are listed whole if the check goes on.
  local picked, whole = {}, {}
  for _, r in ipairs(rels) do
    local rel, scope = r[1], r[2]
    local zg, zr = P .. ':lex:' .. rel .. '|g', P .. ':lex:' .. rel .. '|r'
    if scope == 0 then
      local c = rcall('HMGET', P .. ':rel', rel .. '|g', rel .. '|r')
      -- From the index as well: one that drifted low must not hide a
      -- clear under way (below).
      grants = grants + math.max(as_count(c[1]) or 0, rcall('ZCARD', zg))
      -- Revokes from the index as well as the counter: one that drifted
      -- low (data fga-wb did not write) must not let a revoke through.
      revokes = revokes + math.max(as_count(c[2]) or 0, rcall('ZCARD', zr))
      tinsert(whole, r)
    else
      local ng = rcall('ZLEXCOUNT', zg, lo, hi)
      local nr = rcall('ZLEXCOUNT', zr, lo, hi)
      if scope == 1 or ng + nr > SCAN_MAX then
        grants = grants + ng
        revokes = revokes + nr
        tinsert(whole, r)
      else
        if nr > 0 then
          for _, k in ipairs(rcall('ZRANGEBYLEX', zr, lo, hi)) do
            if counts(k) then revokes = revokes + 1 end
          end
        end
        if ng > 0 then
          for _, k in ipairs(rcall('ZRANGEBYLEX', zg, lo, hi)) do
            if counts(k) then
              grants = grants + 1
              tinsert(picked, k)
            end
          end
        end
      end
    end
  end
  -- Ops that died of transient causes while current: OpenFGA may still
  -- hold what a revoke revokes, or lack what a grant takes away (see
  -- P:deadrev). Empty but in an outage, so one ZCARD is all a check pays
  -- otherwise.
  local dead = 0
  local sizes = {}
  for _, ix in ipairs({ K_DEADREV, K_DEADGR }) do
    local n = pcall_('ZCARD', ix)
    if type(n) ~= 'number' then
      return redis.error_reply('fga-wb: Redis key ' .. ix .. ' is not a sorted set; it was not written by fga-wb (remove it, or use another redis.key_prefix)')
    end
    sizes[ix] = n
  end
  if sizes[K_DEADREV] + sizes[K_DEADGR] > 0 then
    -- Still its key's newest letter, a transient one of the index's kind
    -- (a plain grant for P:deadgr), with no newer op.
    local function current(k, plain)
      -- An entry that cannot be read counts as none (as everywhere).
      if parse(rcall('HGET', K_OPS, k)) then return false end
      local id = rcall('HGET', K_DEADKEY, k)
      local d = id and id ~= '0' and letter(rcall('HGET', K_DEAD, id))
      return d and d.transient == true and ((d.op == 'g' and d.cond == '') == plain)
    end
    -- Each scope's candidates, or their number when there are too many to
    -- look at each (then the checks they can change fail closed). Plain
    -- grants only where a grant takes access away (`deny`; any relation
    -- without a model).
    local scans = {}
    if nrels == 0 then
      scans[1] = { K_DEADREV, false, sizes[K_DEADREV], false }
      scans[2] = { K_DEADGR, false, sizes[K_DEADGR], true }
    else
      for _, r in ipairs(rels) do
        for _, ix in ipairs({ K_DEADREV, r[3] and K_DEADGR or nil }) do
          local z = deadrev_key(r[1], ix)
          local n = r[2] == 0 and rcall('ZCARD', z) or rcall('ZLEXCOUNT', z, lo, hi)
          if n > 0 then tinsert(scans, { z, r[2], n, ix == K_DEADGR }) end
        end
      end
    end
    for _, sc in ipairs(scans) do
      local z, scope, n, plain = sc[1], sc[2], sc[3], sc[4]
      if n > SCAN_MAX then
        dead = dead + n
      elseif n > 0 then
        local found = (scope == false or scope == 0) and rcall('ZRANGE', z, 0, -1)
          or rcall('ZRANGEBYLEX', z, lo, hi)
        for _, k in ipairs(found) do
          if (scope ~= 2 or counts(k)) and current(k, plain) then dead = dead + 1 end
        end
      end
    end
  end
  -- A clear under way (its steps are separate calls) counts as a revoke
  -- still to be written for a check that would send pending grants: between
  -- two steps it could see a revoke dropped and a grant not yet, a state that
  -- never existed (a folder's parent link revoked, a grant on the folder:
  -- `allowed`, where before and after the clear it is not). It waits for
  -- the clear to end. A check without pending grants answers as after the
  -- clear, and one with a revoke waits anyway.
  if revokes == 0 and grants > 0 then
    local on, bad = clearing_now()
    if bad then return redis.error_reply(bad) end
    if on then revokes = 1 end
  end
  if revokes > 0 or grants > limit or dead > 0 then return { revokes, grants, -1, dead } end
  local out = { revokes, grants, written_ago(rels, object, nrels == 0), 0 }
  local keys = picked
  for _, r in ipairs(whole) do
    local found
    if r[2] == 0 then
      found = rcall('ZRANGE', P .. ':lex:' .. r[1] .. '|g', 0, -1)
    else
      found = rcall('ZRANGEBYLEX', P .. ':lex:' .. r[1] .. '|g', lo, hi)
    end
    for _, k in ipairs(found) do tinsert(keys, k) end
  end
  if #keys > 0 then
    local raw = read_raw(keys)
    for i, key in ipairs(keys) do
      local e = parse(raw[i])
      if e and e.op == 'g' then
        tinsert(out, key)
        tinsert(out, e.cond)
      end
    end
  end
  return out
end

-- latest pub key -> {op, cond} of the key's latest op, or {} (none or corrupt:
-- then {'?'}). {} too while a clear is under way: a check that takes a
-- pending grant's op as its answer must wait for the clear, as one that
-- would send it does (see relevant), or it could answer from before the
-- clear after another check answered from after it.
if cmd == 'latest' then
  local on, bad = clearing_now()
  if bad then return redis.error_reply(bad) end
  if on then return {} end
  local raw = rcall('HGET', P .. ':ops', ARGV[3])
  if not raw then return {} end
  local e = parse(raw)
  if not e then return { '?' } end
  return { e.op, e.cond }
end

-- landed pub key* -> 0: requests changed these keys' tuples in OpenFGA
-- though their ops are not ending applied (see note_written).
if cmd == 'landed' then
  local keys = {}
  for i = 3, #ARGV do keys[#keys + 1] = ARGV[i] end
  note_written(keys)
  return 0
end

-- owes pub key -> 1 if a revoke of the key is still to reach OpenFGA: its
-- latest op is a revoke (a grant that died since pended it again, or the
-- application revoked since), or a grant that owes one (P:owes, unless a
-- write lands too), or a letter of the key still leaves one owed (a
-- revoke's given up, or an owing grant's, with no op buffered); else 0.
if cmd == 'owes' then
  local e = parse(rcall('HGET', P .. ':ops', ARGV[3]))
  if e and (e.op == 'r' or revokes(ARGV[3], e)) then return 1 end
  if owed_revoke(ARGV[3]) or owing_letter(ARGV[3]) then return 1 end
  return 0
end

-- clear pub now cursor up_to jobs_up_to [writer call]
--   -> {next cursor, up_to, jobs_up_to, (key, op, cond)*}
-- One step of a clear, so that a large backlog never holds Redis for long:
-- drops the ops among about CLEAR_STEP keys of P:ops that are pending or held
-- by a job no worker runs, if acknowledged before the clear began (sequence
-- number <= up_to: an op acknowledged since is kept). The first step (cursor
-- 0, jobs_up_to '') reads jobs_up_to (the last job id), and up_to unless the
-- caller gave it (the last seq when the operator was asked); the last step
-- (next cursor 0) drops the jobs up to jobs_up_to that no worker runs.
-- call: the writer's id for this step. A Redis Cluster client sends a
-- step again after a dropped connection although it may have run: the
-- repeat answers what the first run dropped, which is the operator's only
-- record of those ops. A writer's steps follow one another, so Redis
-- keeps the answer of its last only (P:clearans:<writer>, 10 min).
local CLEAR_STEP = 500
-- How long a clear's step counts as under way: steps follow each other at once.
local CLEARING_MS = 5000
if cmd == 'clear' then
  local bad = check_keys({})
  if bad then return redis.error_reply(bad) end
  local call = ARGV[8] or ''
  local K_ANSWER = P .. ':clearans:' .. (ARGV[7] or '')
  if call ~= '' then
    local kept = pcall_('GET', K_ANSWER)
    local answer = type(kept) == 'string' and smatch(kept, '^([^\n]*)\n') == call
      and ssub(kept, #call + 2)
    if answer then
      local ok, out = pcall(cjson.decode, answer)
      if ok and type(out) == 'table' then return out end
    end
  end
  local up_to, jobs_up_to = ARGV[5], ARGV[6]
  if up_to == '' then up_to = rcall('GET', P .. ':seq') or '0' end
  if jobs_up_to == '' then jobs_up_to = rcall('GET', P .. ':jobseq') or '0' end
  local seq_limit, job_limit = tonumber(up_to) or 0, tonumber(jobs_up_to) or 0
  local running = {}
  for _, id in ipairs(rcall('HKEYS', P .. ':jobrun')) do running[id] = true end
  local scan = rcall('HSCAN', K_OPS, ARGV[4], 'COUNT', CLEAR_STEP)
  -- Checks that send pending grants wait while it lasts (see relevant):
  -- each clear notes itself (by its bounds) until its next step is due,
  -- its last step takes it out, and one whose caller stopped between steps
  -- stops counting after CLEARING_MS.
  local clearing = P .. ':clearing'
  local me = up_to .. '|' .. jobs_up_to
  if scan[1] ~= '0' then
    -- A write that takes no memory first: a full Redis (maxmemory, which a
    -- clear is run to free) refuses only a script's first write that can
    -- take some, and this note must be there while the steps drop ops.
    pcall_('PEXPIRE', clearing, CLEARING_MS)
    pcall_('ZADD', clearing, redis_ms() + CLEARING_MS, me)
    pcall_('PEXPIRE', clearing, CLEARING_MS)
  else
    pcall_('ZREM', clearing, me)
  end
  local keys = {}
  for i = 1, #scan[2], 2 do keys[#keys + 1] = scan[2][i] end
  load(keys)
  local out, cleared, cleared_seqs = { scan[1], up_to, jobs_up_to }, {}, {}
  local function clear_entry(key, e)
    drop(key, e)
    cleared[#cleared + 1] = key
    cleared_seqs[#cleared] = e.seq
    out[#out + 1] = key
    out[#out + 1] = e.op
    out[#out + 1] = e.cond
  end
  local skipped = {}
  for _, key in ipairs(keys) do
    local e = cache[key]
    if e and (tonumber(e.seq) or 0) <= seq_limit
        and (e.state == 'r' or (e.state == 'j' and not running[e.job])) then
      clear_entry(key, e)
    elseif e and e.state == 'j' then
      skipped[e.job] = true
    end
    -- A blocked op (state b) is kept: its entry is what keeps a newer op
    -- from being written before the older op's write in progress ends.
  end
  -- Jobs whose ops a step kept because the job was running, for the last
  -- step (a clear's steps are separate calls).
  local K_SKIPPED = P .. ':clearskip'
  for id, _ in pairs(skipped) do pcall_('SADD', K_SKIPPED, id) end
  -- Kept as long as a clear is under way, whether this step skipped a job
  -- or not: lost before the last step, a job that went back to the queue
  -- since would be dropped with ops of its still held.
  pcall_('PEXPIRE', K_SKIPPED, 600000)
  local last = scan[1] == '0'
  local gone = {}
  if last then
    -- Jobs that a step found running (P:clearskip) and that are not now.
    local again = {}
    local listed = pcall_('SMEMBERS', K_SKIPPED)
    for _, id in ipairs(type(listed) == 'table' and listed or {}) do again[id] = true end
    -- Jobs left with nothing to write. One that a step found running may
    -- have gone back to the queue since (its write failed): its ops go with
    -- it, cleared (or pending again if newer than the clear), never left
    -- held by a job that is gone, where nothing would ever write or end
    -- them. Only those jobs: the others' ops were cleared as the steps met
    -- them. P:clearskip is shared by clears running at once: each takes
    -- out only the jobs it ends.
    for _, id in ipairs(rcall('HKEYS', P .. ':jobs')) do
      if not running[id] and (tonumber(id) or 0) <= job_limit then
        if again[id] then
          pcall_('SREM', K_SKIPPED, id)
          local held = rcall('SMEMBERS', P .. ':jk:' .. id)
          load(held)
          for _, key in ipairs(held) do
            local e = cache[key]
            if e and e.state == 'j' and e.job == id then
              if (tonumber(e.seq) or 0) <= seq_limit then
                clear_entry(key, e)
              else
                move(key, e, 'r')
              end
            end
          end
        end
        gone[#gone + 1] = id
      end
    end
  end
  if #cleared > 0 then
    -- A dropped op may have been written already, its write's outcome
    -- unknown then (pending again after the hold) or its end not
    -- recorded (a worker whose term moved on): what OpenFGA caches may
    -- predate that write, and nothing else will say so to checks.
    note_written(cleared)
    supersede_letters(cleared, cleared_seqs, true)
    forget_replays(cleared)
    incr(P .. ':stats', 'cleared', #cleared)
    for _, f in ipairs(rcall('HKEYS', P .. ':gen')) do incr(P .. ':gen', f, 1) end
    incr(P .. ':gen', '*', 1)
  end
  apply_writes()
  -- The jobs last: a call that fails before this leaves them with their
  -- ops (a later clear ends both), never ops held by a job that is gone.
  for _, id in ipairs(gone) do
    rcall('HDEL', P .. ':jobs', id)
    rcall('HDEL', P .. ':jobc', id)
    rcall('ZREM', P .. ':jobq', id)
    pcall_('ZREM', K_JOBMIN, id)
    rcall('DEL', P .. ':jk:' .. id)
  end
  if last or #cleared > 0 then publish('all') end
  if call ~= '' then pcall_('SET', K_ANSWER, call .. '\n' .. cjson.encode(out), 'PX', ANSWERS_KEEP_MS) end
  return out
end

-- usage pub cursor -> {next cursor, (category, keys, bytes)*}
-- One step of a SCAN over the store's keys (at most 1000 looked at, so Redis
-- is never blocked long): how many keys and bytes each category holds.
-- Categories: pending (ops and their indexes, writers' sets), dead (dead
-- letters), queue (jobs), meta (counters, epochs, write marks), legacy
-- (apalis job keys `P:jobs:*` left by versions before fga-wb kept jobs in
-- its own keys).
local function category(key)
  local rest = ssub(key, #P + 2)
  if ssub(rest, 1, 5) == 'jobs:' then return 'legacy' end
  local head = smatch(rest, '^([^:]*)')
  if head == 'ops' or head == 'ready' or head == 'lex' or head == 'blocked' or head == 'w'
    or head == 'owes' then
    return 'pending'
  end
  if head == 'dead' or head == 'deadseq' or head == 'deadkey' or head == 'deadrev'
    or head == 'deadgr' or head == 'deadcur' or head == 'replayn' or head == 'replayz'
    or head == 'left' then
    return 'dead'
  end
  if head == 'jobs' or head == 'jobc' or head == 'jobq' or head == 'jobrun' or head == 'jk'
    or head == 'wj' or head == 'badjobs' or head == 'jobmin' then
    return 'queue'
  end
  -- Counters (counts, rel, seq, jobseq, stats, gen), epochs, owners, write
  -- marks, finish answers: a fixed set of keys (or one per writer),
  -- whatever the volume.
  return 'meta'
end

-- Letters by id, or every letter for '*', in id order.
local function letter_ids(from)
  local ids = {}
  if ARGV[from] == '*' then
    ids = rcall('HKEYS', K_DEAD)
    table.sort(ids, function(a, b) return (tonumber(a) or 0) < (tonumber(b) or 0) end)
  else
    for i = from, #ARGV do tinsert(ids, ARGV[i]) end
  end
  return ids
end

-- Removes letter `id`; with `key` (its tuple's, while the letter is the
-- key's newest), the key's letter bookkeeping too.
local function remove_letter(id, key)
  rcall('HDEL', K_DEAD, id)
  if key then
    rcall('HDEL', K_DEADKEY, key)
    unindex_dead(key)
  end
end

-- `d`, the key's newest letter, goes while `cur` (the key's entry) is
-- buffered: a grant given up that owed a revoke (see finish) passes the
-- debt to `cur`, if a grant that owes none.
local function pass_debt(d, cur)
  if d.owes == true and cur and cur.op == 'g' and not debt_of(d.key, cur) then
    owe(d.key, cur.seq)
  end
end

-- A tuple's deaths after a worker's replays (see replay) are counted in
-- P:replayn (key -> "count|since|applied", since: the first replay of the
-- window, Redis's clock) and P:replayz (key -> since, to forget them after
-- REPLAYS_WINDOW_MS); P:left holds the keys whose letters a worker left for
-- an operator, their count at its limit.

-- `key`'s count within the window: its deaths after a worker's replays
-- while other writes landed, since when, and the store's applied total at
-- its last replay (nil: none yet in the window).
local function replays_of(key, now)
  local v = pcall_('HGET', K_REPLAYN, key)
  local n, since, at = smatch(type(v) == 'string' and v or '', '^(%d+)|(%d+)|(%d+)$')
  n, since = tonumber(n), tonumber(since)
  if not n or since + REPLAYS_WINDOW_MS <= now then return 0, now, nil end
  return n, since, tonumber(at)
end

-- Letters a worker left for an operator (see replay) whose ops were
-- placed up to `up_to`: no replay of the workers' writes them within their
-- hour. A member whose letter is gone, or whose hour ended, is forgotten.
local function left_letters(up_to)
  local left = 0
  local members = pcall_('SMEMBERS', K_LEFT)
  if type(members) ~= 'table' or members.err or #members == 0 then return 0 end
  local stale, now = {}, redis_ms()
  for from = 1, #members, PART do
    local part = { unpack(members, from, math.min(from + PART - 1, #members)) }
    local ids = hmget(K_DEADKEY, part)
    local at = rcall('ZMSCORE', K_DEADCUR, unpack(part))
    local since = pcall_('ZMSCORE', K_REPLAYZ, unpack(part))
    if type(since) ~= 'table' or since.err then since = {} end
    for i, key in ipairs(part) do
      local first, counted_since = tonumber(at[i]), tonumber(since[i])
      if not ids[i] or ids[i] == '0' or not first
          or not counted_since or counted_since + REPLAYS_WINDOW_MS <= now then
        stale[#stale + 1] = key
      elseif first <= up_to then
        left = left + 1
      end
    end
  end
  in_parts(pcall_, 'SREM', K_LEFT, stale, #stale)
  return left
end

-- left pub -> letters workers left for an operator (see replay)
if cmd == 'left' then
  return left_letters(math.huge)
end

-- replay pub now cap who (id* | '*')
--   -> {replayed, superseded, kept, waiting, left, (key, cond)* of the replayed}
-- Each letter, in one step: dropped if superseded (its key has an entry, or
-- P:deadkey does not name it), else buffered again as a new op; with the
-- buffer full, it and the rest stay. A transient revoke's letter whose key
-- has an entry stays as it is: it is owed until that op is written.
--   who: '0' an operator (every letter); '1' a worker, by itself (only
--   letters of ops that died of transient causes), or "1|limit": a worker
--   that leaves a tuple's letter once it died again `limit` times within
--   an hour after its replays while other writes landed (the store's
--   applied total moved since the replay: OpenFGA takes writes, not this
--   one; in an outage of writes alone nothing counts). A tuple OpenFGA
--   fails every time (a row its datastore cannot hold) died again after
--   each replay, for good: past the limit its letter stays, `left` for an
--   operator (P:left, which `unfinished` counts), until an operator's
--   replay, a purge, an op on the tuple that lands, or the hour's end.
if cmd == 'replay' then
  local now, cap, only_transient = ARGV[3], tonumber(ARGV[4]), ssub(ARGV[5], 1, 1) == '1'
  local limit = only_transient and tonumber(smatch(ARGV[5], '^1|(%d+)$') or '') or 0
  local ids = letter_ids(6)
  local size = rcall('HLEN', K_OPS)
  local replayed, superseded, kept, waiting, left = 0, 0, 0, 0, 0
  local rnow = redis_ms()
  -- Keys whose counts go (superseded letters; an operator's replay starts
  -- a tuple's count again).
  local forgotten, recounted = {}, false
  local any_left = pcall_('EXISTS', K_LEFT) == 1
  local applied_now = 0
  if only_transient then
    -- Counts whose window ended, a bounded number a call.
    local old = pcall_('ZRANGEBYSCORE', K_REPLAYZ, '-inf', rnow - REPLAYS_WINDOW_MS, 'LIMIT', 0, 500)
    if type(old) == 'table' and not old.err then drop_counts(old) end
    applied_now = as_count(pcall_('HGET', P .. ':stats', 'applied')) or 0
  end
  -- A key's count with this death in it: it counts when other writes
  -- landed since the key's last replay (see above).
  local counts = {}
  local function counted(key)
    if not counts[key] then
      local n, since, at = replays_of(key, rnow)
      if at and applied_now > at then n = n + 1 end
      counts[key] = { n, since }
    end
    return counts[key][1], counts[key][2]
  end
  local out, rels, done, gone = {}, {}, {}, {}
  local handled = {}
  for i, id in ipairs(ids) do
    local d = not handled[id] and letter(rcall('HGET', K_DEAD, id))
    handled[id] = true
    if d and (not only_transient or d.transient == true) then
      load({ d.key })
      local latest = rcall('HGET', K_DEADKEY, d.key)
      if cache[d.key] and latest == tostring(id) and d.transient == true and d.op == 'r' then
        -- A revoke owed until the newer op buffered on its key is written
        -- (see finish): not superseded yet, and not replayed over that op.
        waiting = waiting + 1
      elseif cache[d.key] and latest == tostring(id)
          and (tonumber(cache[d.key].seq) or 0) < (tonumber(d.seq) or 0) then
        -- Numbered after a revoke owed before it (see finish): replayable
        -- once that is written.
        waiting = waiting + 1
      elseif cache[d.key] or latest ~= tostring(id) then
        if latest == tostring(id) then pass_debt(d, cache[d.key]) end
        superseded = superseded + 1
        tinsert(gone, { id = id, key = latest == tostring(id) and d.key })
        -- Superseded by a buffered op, not by a newer letter (whose count
        -- goes on).
        if latest == tostring(id) then forgotten[#forgotten + 1] = d.key end
      elseif limit > 0 and counted(d.key) >= limit then
        left = left + 1
        pcall_('SADD', K_LEFT, d.key)
      elseif size >= cap then
        kept = #ids - i + 1
        break
      else
        if limit > 0 then
          local n, since = counted(d.key)
          pcall_('HSET', K_REPLAYN, d.key, sformat('%.0f|%.0f|%.0f', n, since, applied_now))
          pcall_('ZADD', K_REPLAYZ, since, d.key)
          recounted = true
          if any_left then pcall_('SREM', K_LEFT, d.key) end
        elseif not only_transient then
          forgotten[#forgotten + 1] = d.key
        end
        local e = rebuffer(d, now)
        -- A grant given up that owed a revoke owes it again.
        if d.owes == true and d.op == 'g' then owe(d.key, e.seq) end
        size = size + 1
        replayed = replayed + 1
        local rel = rel_of(d.key)
        if rel then rels[rel] = true end
        tinsert(out, d.key)
        tinsert(out, d.cond)
        tinsert(done, id)
      end
    end
  end
  if replayed > 0 then incr(P .. ':stats', 'acknowledged', replayed) end
  bump_gen(rels)
  apply_writes()
  -- The letters of the replayed ops go once the ops are pending again, and
  -- superseded ones once the debts they pass on are written: a call that
  -- fails before this leaves the letters, never an op or a debt in neither.
  for i, id in ipairs(done) do remove_letter(id, out[2 * i - 1]) end
  for _, g in ipairs(gone) do remove_letter(g.id, g.key) end
  forget_replays(forgotten)
  if recounted then
    -- Every count is stale an hour after the last was written.
    pcall_('PEXPIRE', K_REPLAYN, REPLAYS_WINDOW_MS)
    pcall_('PEXPIRE', K_REPLAYZ, REPLAYS_WINDOW_MS)
  end
  local res = { replayed, superseded, kept, waiting, left }
  for _, v in ipairs(out) do tinsert(res, v) end
  return res
end

-- dlqdrop pub now (id* | '*' [up_to]) -> {repended, (id, letter)*}: removes
-- letters (purge). Purged, a grant given up that owed a revoke (see finish)
-- is never written, but its debt stays: with it gone, what the application
-- said last before it is that revoke, and OpenFGA may still hold what it
-- revokes. It passes to a grant buffered after it that owes none, or,
-- with no op buffered on the key, the revoke is pending again in the
-- grant's place in line (`repended` of them), as when OpenFGA refuses such
-- a grant for good.
if cmd == 'dlqdrop' then
  local now = ARGV[3]
  local out, gone, handled, rels, repended, unsure, purged = {}, {}, {}, {}, 0, {}, {}
  -- With '*', a bound spares the letters numbered after it (written while
  -- an operator was asked); ids that are no number go.
  local bound = ARGV[4] == '*' and tonumber(ARGV[5]) or nil
  for _, id in ipairs(letter_ids(4)) do
    local raw = not handled[id] and (not bound or not tonumber(id) or tonumber(id) <= bound)
      and rcall('HGET', K_DEAD, id)
    handled[id] = true
    if raw then
      tinsert(out, id)
      tinsert(out, raw)
      local d = letter(raw)
      local current = d and rcall('HGET', K_DEADKEY, d.key) == tostring(id)
      if current and d.transient == true and d.op == 'g' and d.owes == true then
        load({ d.key })
        local cur = cache[d.key]
        if not cur then
          rebuffer({ key = d.key, op = 'r', cond = '', first = d.first, since = d.since }, now)
          repended = repended + 1
          local rel = rel_of(d.key)
          if rel then rels[rel] = true end
        end
        pass_debt(d, cur)
      end
      -- Given up in an outage: its last Write's outcome may be unknown,
      -- and landed; with the letter gone nothing else says so to checks.
      if current and d.transient == true then tinsert(unsure, d.key) end
      if current then tinsert(purged, d.key) end
      tinsert(gone, { id = id, key = current and d.key })
    end
  end
  if #unsure > 0 then note_written(unsure) end
  -- Counted as a replay counts them.
  if repended > 0 then incr(P .. ':stats', 'acknowledged', repended) end
  bump_gen(rels)
  apply_writes()
  -- The letters go once what they owed is buffered: a call that fails
  -- before this leaves them, never a debt in neither place.
  for _, g in ipairs(gone) do remove_letter(g.id, g.key) end
  -- Purged, a tuple's count of replays starts again.
  forget_replays(purged)
  if ARGV[4] == '*' and rcall('HLEN', K_DEAD) == 0 then
    -- Every letter is gone: so is every index entry (the keys of the
    -- relations' indexes are the members' relations).
    local ixs = {}
    for _, ix in ipairs({ K_DEADREV, K_DEADGR }) do
      for _, k in ipairs(rcall('ZRANGE', ix, 0, -1)) do
        local rel = rel_of(k)
        if rel then ixs[deadrev_key(rel, ix)] = true end
      end
    end
    for z, _ in pairs(ixs) do rcall('DEL', z) end
    rcall('DEL', K_DEADKEY, K_DEADREV, K_DEADGR, K_DEADCUR)
  end
  -- Ready again: other processes' flushers take it.
  if repended > 0 then publish('finished') end
  tinsert(out, 1, repended)
  return out
end

-- deadstate pub (key id)* -> {superseded (0/1)}*: whether each letter
-- (its tuple's key and its id) is superseded; used by listings.
if cmd == 'deadstate' then
  local out = {}
  for i = 3, #ARGV, 2 do
    local key, id = ARGV[i], ARGV[i + 1]
    load({ key })
    local e = cache[key]
    local named = rcall('HGET', K_DEADKEY, key) == id
    -- A revoke owed until the newer op on its key is written is not
    -- superseded by it, nor a letter numbered after a revoke owed before
    -- it (see replay).
    local owed = e and named and select(2, owed_revoke(key)) == id
    local d = e and named and letter(rcall('HGET', K_DEAD, id))
    local ahead = d and (tonumber(e.seq) or 0) < (tonumber(d.seq) or 0)
    tinsert(out, ((e and not owed and not ahead) or not named) and 1 or 0)
  end
  return out
end

if cmd == 'usage' then
  local r = rcall('SCAN', ARGV[3], 'MATCH', P .. ':*', 'COUNT', 1000)
  local sums, order = {}, {}
  for _, key in ipairs(r[2]) do
    local c = category(key)
    if not sums[c] then
      sums[c] = { 0, 0 }
      tinsert(order, c)
    end
    sums[c][1] = sums[c][1] + 1
    -- An ACL may deny MEMORY: the keys are still counted (0 bytes).
    sums[c][2] = sums[c][2] + (tonumber(pcall_('MEMORY', 'USAGE', key)) or 0)
  end
  local out = { r[1] }
  for _, c in ipairs(order) do
    tinsert(out, c)
    tinsert(out, sums[c][1])
    tinsert(out, sums[c][2])
  end
  return out
end

-- sweep pub cursor -> {next cursor, deleted}
-- One step of deleting what older versions left: the `legacy` keys above
-- and, in the first step, claim lists (P:jobc) whose job is gone. A worker
-- of a version before the lists finishes a job this version queued without
-- deleting its list; nothing reads it again, as job ids are never reused.
if cmd == 'sweep' then
  local orphans = 0
  if ARGV[3] == '0' then
    local bad = expect_types({ { P .. ':jobc', 'hash' }, { P .. ':jobs', 'hash' } })
    if bad then return redis.error_reply(bad) end
    local gone = {}
    for _, id in ipairs(rcall('HKEYS', P .. ':jobc')) do
      if rcall('HEXISTS', P .. ':jobs', id) == 0 then gone[#gone + 1] = id end
    end
    in_parts(rcall, 'HDEL', P .. ':jobc', gone, #gone)
    orphans = #gone
  end
  local r = rcall('SCAN', ARGV[3], 'MATCH', P .. ':jobs:*', 'COUNT', 1000)
  local keys = r[2]
  in_parts(rcall, 'UNLINK', false, keys, #keys)
  return { r[1], #keys + orphans }
end

-- pending pub now -> {pg, pr, t, oldest_since_ms or -1, j, reclaimed}
if cmd == 'pending' then
  local now = tonumber(ARGV[3])
  local reclaimed = 0
  -- Called on every look of every pump and `flush --wait`: the type checks
  -- that guard reclaim's writes run only when a lease has ended.
  local ended = pcall_('ZRANGEBYSCORE', P .. ':owners', '-inf', now, 'LIMIT', 0, 1)
  if type(ended) == 'table' and ended[1] and check_keys({}) == nil then
    reclaimed = reclaim(now)
  end
  apply_writes()
  local c = rcall('HMGET', P .. ':counts', 'pg', 'pr', 't', 'j')
  local oldest = -1
  for _, kind in ipairs({ 'g', 'r' }) do
    local k = rcall('ZRANGE', P .. ':ready:' .. kind, 0, 0)[1]
    if k then
      local e = parse(rcall('HGET', P .. ':ops', k))
      local since = e and tonumber(e.since)
      if since and (oldest < 0 or since < oldest) then oldest = since end
    end
  end
  return { pending_count(c[1], 'g'), pending_count(c[2], 'r'), as_count(c[3]) or 0, oldest,
           as_count(c[4]) or 0, reclaimed }
end

-- badjob pub now id -> a worker could not decode job `id`: set it aside
if cmd == 'badjob' then
  local id = ARGV[4]
  local raw = rcall('HGET', P .. ':jobs', id)
  -- Set aside already: this call, sent again by a Redis Cluster client
  -- after its reply was lost, would count it twice and overwrite what was
  -- kept of it.
  if not raw and rcall('HEXISTS', P .. ':badjobs', id) == 1 then return 0 end
  local back = drop_bad_job(id, raw, tonumber(ARGV[3]))
  if back > 0 then publish('finished') end
  return back
end

-- blocked pub up_to -> ops pending behind a write in progress, with first <= up_to
if cmd == 'blocked' then
  return rcall('ZCOUNT', P .. ':blocked', '-inf', tonumber(ARGV[3]))
end

-- pendingupto pub up_to -> 1 if an op with first <= up_to is ready or
-- blocked, else 0: in one look (see Store::pending_up_to).
if cmd == 'pendingupto' then
  local up_to = tonumber(ARGV[3])
  for _, z in ipairs({ K_READY.g, K_READY.r, K_BLOCKED }) do
    if #rcall('ZRANGEBYSCORE', z, '-inf', up_to, 'LIMIT', 0, 1) > 0 then return 1 end
  end
  return 0
end

-- Whether an op of `keys` acknowledged up to seq `up_to` is being
-- written or held by a job: one whose place in line (`first`) is at most
-- `up_to`, or, for a newer op blocked behind a write, the op being
-- written (`ifseq`: a newer op supersedes it). 1 at the first found, else
-- 0; read a part at a time, so a large set found early costs little.
local function any_unfinished(keys, up_to)
  for i = 1, #keys, 500 do
    local part = { unpack(keys, i, math.min(i + 499, #keys)) }
    local raw = rcall('HMGET', K_OPS, unpack(part))
    for j = 1, #part do
      local e = parse(raw[j])
      if e then
        local seq = (e.state == 't' or e.state == 'j') and e.first or (e.state == 'b' and e.ifseq)
        if seq and tonumber(seq) <= up_to then return 1 end
      end
    end
  end
  return 0
end

-- Transient letters an older version wrote are not in P:deadcur: indexed
-- when `unfinished` first looks, by id, 2000 ids a call, so a large set
-- does not hold Redis (P:deadcur:v: the last id looked at, then "done";
-- ids stay where a scan's cursor would not across a restart or a
-- failover). This version indexes the letters it writes as it writes
-- them. Returns whether all are indexed.
local function index_old_letters()
  local at = rcall('GET', K_DEADCUR .. ':v')
  if at == 'done' then return true end
  local from = math.max(0, math.floor(tonumber(at) or 0))
  local last = tonumber(rcall('GET', P .. ':deadseq')) or 0
  -- A loss moves P:deadseq 2^32 past any id handed out (see heartbeat): a
  -- walk that far, 2000 ids a call, would keep `flush --wait` for days.
  -- Far from its end, it ends at the highest id a letter has (read once;
  -- letters written after are this version's, indexed as written).
  local ends = tonumber(rcall('GET', K_DEADCUR .. ':end'))
  if not ends and last - from > 100000 then
    ends = 0
    for _, id in ipairs(rcall('HKEYS', K_DEAD)) do
      local n = tonumber(id)
      if n and n > ends then ends = n end
    end
    rcall('SET', K_DEADCUR .. ':end', sformat('%.0f', ends))
  end
  if ends and ends < last then last = ends end
  local to = math.min(from + 2000, last)
  if to > from then
    local ids = {}
    for id = from + 1, to do ids[#ids + 1] = string.format('%.0f', id) end
    local raw = hmget(K_DEAD, ids)
    for i, id in ipairs(ids) do
      local d = letter(raw[i])
      if d and d.transient == true and rcall('HGET', K_DEADKEY, d.key) == id then
        index_dead_current(d.key, tonumber(d.first) or tonumber(d.seq))
      end
    end
  end
  local done = to >= last
  rcall('SET', K_DEADCUR .. ':v', done and 'done' or string.format('%.0f', to))
  if done then rcall('DEL', K_DEADCUR .. ':end') end
  return done
end

-- unfinished pub up_to -> {ops, letters, left}: of the ops acknowledged up to
-- seq `up_to` (flush --wait's start), how many are still pending (exact),
-- or else whether one is being written or held by a job (1: the look ends
-- at the first), and, once none is, how many died of transient causes
-- with letters that are still their tuples' latest (a replay may still
-- write them; once one is found, the letters listed for them). In one call, so an op moving on (taken,
-- handed back, dead, replayed: a replayed op keeps its letter's place in
-- line) is seen where it is. Only indexes are read: the ready and blocked
-- sets, the writers' sets, the jobs P:jobmin lists as holding such ops
-- when queued, the letters P:deadcur lists. `left`: of those letters, the
-- ones workers left for an operator (see left_letters).
if cmd == 'unfinished' then
  local up_to = tonumber(ARGV[3])
  local n = rcall('ZCOUNT', K_READY.g, '-inf', up_to) + rcall('ZCOUNT', K_READY.r, '-inf', up_to)
    + rcall('ZCOUNT', K_BLOCKED, '-inf', up_to)
  if n == 0 then
    -- A held-over writer stays among the owners until reclaim hands its
    -- keys on.
    for _, w in ipairs(rcall('ZRANGE', P .. ':owners', 0, -1)) do
      n = any_unfinished(rcall('SMEMBERS', P .. ':w:' .. w), up_to)
      if n > 0 then break end
    end
  end
  if n == 0 then
    -- The listed jobs; all of them while some are not listed (queued by
    -- an older version), which listed ones ended by an older version
    -- (taken out as they are met) may hide until then.
    local pass = 1
    while n == 0 and pass <= 2 do
      local indexed = rcall('ZCARD', K_JOBMIN) >= rcall('HLEN', P .. ':jobs')
      local ids = indexed and rcall('ZRANGEBYSCORE', K_JOBMIN, '-inf', up_to)
        or rcall('HKEYS', P .. ':jobs')
      local pruned = 0
      for _, id in ipairs(ids) do
        if indexed and rcall('HEXISTS', P .. ':jobs', id) == 0 then
          pcall_('ZREM', K_JOBMIN, id)
          pruned = pruned + 1
        else
          n = any_unfinished(rcall('SMEMBERS', P .. ':jk:' .. id), up_to)
          if n > 0 then break end
        end
      end
      pass = (indexed and pruned > 0) and pass + 1 or 3
    end
  end
  -- Until the letters older versions wrote are indexed, something is
  -- taken to be left (not a letter: no op is known to have died).
  if n == 0 and not index_old_letters() then n = 1 end
  local letters = 0
  if n == 0 then
    -- A page at a time, until one is still current: then all listed.
    local from = 0
    local found = false
    while not found do
      local keys = rcall('ZRANGEBYSCORE', K_DEADCUR, '-inf', up_to, 'LIMIT', from, 100)
      if #keys == 0 then break end
      for _, key in ipairs(keys) do
        local id = rcall('HGET', K_DEADKEY, key)
        local d = id and id ~= '0' and letter(rcall('HGET', K_DEAD, id))
        if d and d.transient == true then
          if not parse(rcall('HGET', K_OPS, key)) then
            letters = rcall('ZCOUNT', K_DEADCUR, '-inf', up_to)
            found = true
            break
          elseif d.op == 'r' then
            -- Owed until the newer op buffered on its key is written (see
            -- finish): an op left, not a letter a replay would write. Left
            -- also when that op came after `up_to`: refused for good, it
            -- brings the revoke back in its own place in line. (Queue
            -- workers queue that op once it is old; inline, a flusher
            -- writes it by age.)
            n = 1
            found = true
            break
          end
        end
      end
      from = from + #keys
    end
  end
  return { n, letters, letters > 0 and left_letters(up_to) or 0 }
end

-- queue pub now -> {due, running, scheduled, workers...}
if cmd == 'queue' then
  local now = tonumber(ARGV[3])
  local due = rcall('ZCOUNT', P .. ':jobq', '-inf', now)
  local later = rcall('ZCOUNT', P .. ':jobq', '(' .. now, '+inf')
  local running = rcall('HLEN', P .. ':jobrun')
  local out = { due, running, later }
  for _, w in ipairs(rcall('ZRANGEBYSCORE', P .. ':owners', now, '+inf')) do
    if ssub(w, 1, 7) == 'worker:' and rcall('HEXISTS', P .. ':heldover', w) == 0 then
      tinsert(out, w)
    end
  end
  return out
end

return redis.error_reply('fga-wb: unknown command ' .. tostring(cmd))
