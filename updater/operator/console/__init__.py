"""``inferctl console``: the operator's live web view of the fleet, and a rollout driver.

One long-running process with one MQTT client: :mod:`.state` keeps what the broker says
(devices through :class:`telemetry.fleet.watch.Fleet`, an hour of latency and throughput per
model, quality and drift, recent events), :mod:`.rollouts` advances and halts staged rollouts
through :class:`updater.operator.rollout.RolloutDriver` (the code ``inferctl rollout`` signs
with), :mod:`.server` serves the page, its JSON and a server-sent event stream, and
:mod:`.app` wires them together.

``static/`` holds the page and uPlot 1.6.32 (MIT, ``static/uPlot.LICENSE``), vendored from the
npm package ``uplot`` (``npm pack uplot@1.6.32``: ``dist/uPlot.iife.min.js``,
``dist/uPlot.min.css``, ``LICENSE``): the page loads nothing from elsewhere.
"""
