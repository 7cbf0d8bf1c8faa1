#!/usr/bin/env bash
# A Tron agent in bash and curl: it speaks the agent contract (README, "Bring your own
# agent"), so it gets the whole ladder: beats from its own loop, tasks claimed from the
# daemon, a checkpoint per step, resume after a restart, a result at the end.
#
#   [services.bash-agent]
#   command = ["bash", "examples/bash-agent/agent.sh"]
#   port = 6160
#   heartbeat = true
#
# Tunables (environment): STEPS (3), STEP_SECONDS (0.5), FREEZE=1 to keep beating but
# stop moving (what a stuck LLM loop looks like: TRON calls it no_progress).
set -euo pipefail

steps=${STEPS:-3}
step_seconds=${STEP_SECONDS:-0.5}
token=$(cat "$TRON_TOKEN_FILE")
state=$(mktemp -d)
echo -n "" > "$state/task"
echo -n "" > "$state/progress"

api() {  # api METHOD PATH [JSON]
  curl -sS -m 5 -X "$1" -H "X-Tron-Token: $token" -H "Content-Type: application/json" \
       ${3:+--data "$3"} "$TRON_DAEMON_URL$2"
}

json_str() {  # a JSON string literal of $1 (prompts and outputs hold quotes and newlines)
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\r'/\\r}; s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

attr() { printf '{"key":"%s","value":{"%s":%s}}' "$1" "$2" "$3"; }

span() {  # span NAME START_NS END_NS: this attempt's span, to the collector Tron exports to
  # TRACEPARENT (the span that delegated the task) and SPAN_ID (the one this attempt's span
  # has, so Tron's own ladder spans hang under it) came with the claim. OTLP/HTTP, JSON.
  [ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ] && [ -n "${TRACEPARENT:-}" ] || return 0
  local trace parent
  IFS=- read -r _ trace parent _ <<< "$TRACEPARENT"
  curl -sS -m 2 -o /dev/null -X POST -H "Content-Type: application/json" \
       "${OTEL_EXPORTER_OTLP_ENDPOINT%/}/v1/traces" --data "{\"resourceSpans\":[{\"resource\":{\"attributes\":[
$(attr service.name stringValue "\"$TRON_SERVICE\"")]},\"scopeSpans\":[{\"scope\":{\"name\":\"bash-agent\"},\"spans\":[{
\"traceId\":\"$trace\",\"spanId\":\"$SPAN_ID\",\"parentSpanId\":\"$parent\",\"name\":\"$1\",\"kind\":1,
\"startTimeUnixNano\":\"$2\",\"endTimeUnixNano\":\"$3\",\"attributes\":[
$(attr gen_ai.operation.name stringValue '"invoke_agent"'),$(attr gen_ai.agent.name stringValue "\"$TRON_SERVICE\""),
$(attr tron.task.id stringValue "\"$TASK_ID\""),$(attr tron.task.attempt intValue "\"$ATTEMPT\"")]}]}]}]}" || true
}

beats() {  # every interval; a 409 stale_incarnation means we were replaced: leave
  local seq=0 task progress fields code
  while true; do
    # Beats speak for the agent's own loop: while it is stopped (SIGSTOP), say nothing,
    # so TRON sees the silence a hung agent makes.
    if [ "$(cut -d' ' -f3 "/proc/$$/stat" 2>/dev/null)" = T ]; then sleep "$TRON_HEARTBEAT_INTERVAL"; continue; fi
    task=$(cat "$state/task"); progress=$(cat "$state/progress")
    fields=""
    [ -n "$task" ] && fields+=",\"task_id\":\"$task\""
    [ -n "$progress" ] && fields+=",\"progress\":\"$progress\""
    code=$(curl -sS -m 2 -o "$state/beat" -w '%{http_code}' -X POST -H "X-Tron-Token: $token" \
           -H "Content-Type: application/json" "$TRON_DAEMON_URL/beat" \
           --data "{\"service\":\"$TRON_SERVICE\",\"incarnation\":\"$TRON_INCARNATION\",\"pid\":$$,\"seq\":$seq$fields}" \
           || echo 000)
    # 409 seq_out_of_order (a late beat) or foreign_task: carry on; stale_incarnation: leave
    if [ "$code" = 409 ] && grep -q stale_incarnation "$state/beat"; then kill -TERM $$; exit 0; fi
    seq=$((seq + 1))
    sleep "$TRON_HEARTBEAT_INTERVAL"
  done
}

beats &
beater=$!
trap 'kill $beater 2>/dev/null || true; rm -rf "$state"' EXIT

echo "bash agent $TRON_SERVICE up (incarnation $TRON_INCARNATION, provider ${TRON_PROVIDER:-none})"
while true; do
  # The daemon hands out this service's next task as shell assignments (TASK_ID, PROMPT,
  # DONE_STEP, DONE_OUTPUT), or nothing: 204.
  claim=$(api POST "/tasks/claim?format=shell" \
          "{\"service\":\"$TRON_SERVICE\",\"incarnation\":\"$TRON_INCARNATION\"}") || { sleep 0.5; continue; }
  if [ -z "$claim" ]; then sleep 0.2; continue; fi
  eval "$claim"
  started=$(date +%s%N)
  echo -n "$TASK_ID" > "$state/task"
  output="$DONE_OUTPUT"
  echo "task $TASK_ID: resuming after step $DONE_STEP of $steps"
  for ((step = DONE_STEP + 1; step <= steps; step++)); do
    echo -n "step:$step/$steps" > "$state/progress"
    if [ "${FREEZE:-0}" = 1 ]; then sleep 3600; fi
    sleep "$step_seconds"
    output="step $step of: $PROMPT"
    api POST "/tasks/$TASK_ID/checkpoint" \
        "{\"step\":$step,\"step_id\":\"step-$step\",\"output\":$(json_str "$output"),\"incarnation\":\"$TRON_INCARNATION\"}" >/dev/null
  done
  api POST "/tasks/$TASK_ID/finish" \
      "{\"status\":\"done\",\"result\":$(json_str "$output"),\"incarnation\":\"$TRON_INCARNATION\",\"attempt\":$ATTEMPT}" >/dev/null
  span "invoke_agent $TRON_SERVICE" "$started" "$(date +%s%N)" &  # in the background: a hung collector holds nothing
  echo "task $TASK_ID: done"
  echo -n "" > "$state/task"; echo -n "" > "$state/progress"
done
