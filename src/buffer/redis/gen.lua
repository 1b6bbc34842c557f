-- What a cached answer is checked against: the call every check on a
-- shared store makes. A script of its own, not a command of store.lua:
-- Redis runs a script's whole top level on every call, and store.lua's
-- (its key names, helpers and dispatch) cost more than this call's own
-- work, which made it the larger part of a check's time in Redis.
-- Read-only; the key layout is store.lua's.
--
-- KEYS[1] = P; ARGV = gen pub nrels rel*
--   -> {epoch or '', seq, loss open, replid, gen*}
-- nrels = 0: the store-wide counter '*'. replid is the serving node's
-- replication id ('' if it cannot be read): a replica promoted by a
-- failover, or a restarted node, has a new one, which tells a process that
-- it may be reading from before a loss even when the notice of its dropped
-- connection has not reached it yet.
local P = KEYS[1]
local n = tonumber(ARGV[3]) or 0
local info = redis.pcall('INFO', 'replication')
local replid = type(info) == 'string' and string.match(info, 'master_replid:(%w+)') or ''
local out = { redis.call('GET', P .. ':epoch') or '', redis.call('GET', P .. ':seq') or '0',
              redis.call('EXISTS', P .. ':loss'), replid }
local fields = {}
for i = 1, n do fields[i] = ARGV[3 + i] end
if n == 0 then fields[1] = '*' end
local gens = redis.call('HMGET', P .. ':gen', unpack(fields))
for i = 1, #gens do out[4 + i] = gens[i] or '0' end
return out
