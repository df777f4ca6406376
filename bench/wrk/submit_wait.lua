-- wrk script: generateTask with `Prefer: wait=10`, so each answer comes once the task is final
-- (submit -> success in one request). Closed loop: the rate is connections / latency, so pick
-- -c for the rate wanted (docs/BENCHMARKS.md, "submit -> success with wrk").
-- Usage: wrk -t1 -c40 -d10s --latency -s bench/wrk/submit_wait.lua \
--          http://127.0.0.1:PORT/api/v1/generateTask/echo
local key = os.getenv("TASKGATE_API_KEY") or "bench-key-0123456789abcdef"
wrk.method = "POST"
wrk.body = '{"input":{"n":1}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
wrk.headers["Prefer"] = "wait=10"

local not_success = 0
function response(status, headers, body)
  if not string.find(body, '"state":"success"', 1, true) then
    not_success = not_success + 1
  end
end

function done(summary, latency, requests)
  io.write(string.format("answers not in state success: %d\n", not_success))
end
