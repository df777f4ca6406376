-- wrk script: POST the benchmark submit body with the API key.
-- Usage: wrk -t2 -c64 -d15s --latency -s bench/wrk/submit.lua \
--          http://127.0.0.1:PORT/api/v1/generateTask/echo
-- The key comes from TASKGATE_API_KEY (default: the benchmark key). wrk reports answers
-- other than 2xx/3xx as "Non-2xx or 3xx responses"; a valid run has none.
local key = os.getenv("TASKGATE_API_KEY") or "bench-key-0123456789abcdef"
wrk.method = "POST"
wrk.body = '{"input":{"n":1}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key

