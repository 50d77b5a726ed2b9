-- One page of the usage stream for `usage export`: each entry as one JSON array
-- [id, field, value, field, value, …], so that the client decodes one string per record
-- instead of parsing some thirty protocol elements of it.
--
-- KEYS[1] the usage stream. ARGV[1] the first id (`-`, `ms-seq`, or `(ms-seq` for after it),
-- ARGV[2] the last id (`+` or `ms`), ARGV[3] the page size.
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local page = {}
for i, entry in ipairs(entries) do
  local row = {entry[1]}
  for j, value in ipairs(entry[2]) do
    row[j + 1] = value
  end
  page[i] = cjson.encode(row)
end
return page
