-- wrk script: GET with the API key; the URL names the task.
-- Usage: wrk -t2 -c64 -d15s --latency -s bench/wrk/status.lua \
--          'http://127.0.0.1:PORT/api/v1/statusTask/echo?taskId=TASK_ID'
local key = os.getenv("TASKGATE_API_KEY") or "bench-key-0123456789abcdef"
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. key
