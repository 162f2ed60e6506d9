"""--api-server-count N: one engine core and N gateway processes sharing the listening port, on vLLM's own
machinery (the parts of `vllm.entrypoints.cli.serve.run_multi_api_server`): the engine core's ZMQ listeners and
handshake (`bind_engine_zmq_listeners`, `launch_core_engines`), starting, watching and stopping the processes
(`APIServerProcessManager`, `wait_for_completion_or_failure`), the least-loaded accept on the shared socket
(`NoSignalServer`) and Prometheus's multiprocess directory (`setup_multiprocess_prometheus`).

    parent:  download a repo id → bind the port → start the engine core ──ZMQ── N processes, each create_app +
             uvicorn on the shared socket, an AsyncLLM client (client_index i) of the one engine core
    each process answers probes and 503s (with the start-up phase) while the engine core loads
    SIGTERM to the parent → SIGTERM to every process → each drains (--drain-timeout) → the engine core stops
    a process or the engine core dies → the parent stops the rest and exits 1 (the pod's probes fail, it restarts)

What a process owns alone is made right for N: the admission budget is counted in shared memory (admission.Counts),
/metrics renders every process's series, logs name the process, and runtime LoRA loading is refused (app.check_settings).
Per-key limits are the rate-limit store's (docs/api.md). A repo id --model is downloaded by the parent before the
port is bound: the processes load what it downloaded.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from vllm.entrypoints.launchers.launcher import NoSignalServer, create_server_socket
from vllm.usage.usage_lib import UsageContext
from vllm.utils.system_utils import set_process_title
from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
from vllm.v1.executor import Executor
from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus
from vllm.v1.utils import APIServerProcessManager, wait_for_completion_or_failure

from server.gateway import connections
from server.gateway.admission import Counts
from server.gateway.app import DrainingServer, check_settings, create_app
from server.gateway.engine import VLLMEngine
from server.gateway.logs import configure_logging
from server.gateway.metrics import GatewayMetrics
from server.gateway.startup import STATUS_ENV, Startup, download, is_local
from server.settings import Settings

log = logging.getLogger("dsv2.processes")

# Beyond --drain-timeout, what a process may take to stop once drained (the engine client's own shutdown).
STOP_GRACE_S = 15.0


@dataclass
class Front:
    """What every gateway process is started with (pickled into it by vLLM's process manager)."""

    settings: Settings
    model_path: str | None
    counts: Counts


def run(settings: Settings) -> int:
    """The parent: start the engine core and the gateway processes, wait until a signal or a death; 0 when
    stopped by a signal, 1 when something died or failed to start, 2 for bad settings."""
    count = settings.api_server_count
    try:
        check_settings(settings)
        engine = VLLMEngine(settings)  # parses the pass-through engine flags: a bad one stops here
    except SystemExit as exc:  # vLLM's parser rejected a pass-through engine flag (it printed why)
        return exc.code if isinstance(exc.code, int) else 2
    except ValueError as exc:
        log.error("%s", exc)
        return 2

    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info(
                "%s: stopping the %d gateway processes (each drains)", signal.Signals(signum).name, count
            )
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    model_path = None
    manager = launch = None
    failed = True
    status = None
    try:
        if not is_local(settings.model):
            model_path = download(
                settings.model,
                settings.revision,
                settings.download_dir,
                Startup(GatewayMetrics(), "downloading"),
            )
            engine.use_download(model_path)
        setup_multiprocess_prometheus()  # before the processes start: they inherit PROMETHEUS_MULTIPROC_DIR
        fd, status = tempfile.mkstemp(prefix="dsv2-startup-")
        os.close(fd)
        os.environ[STATUS_ENV] = status  # the engine core reports its phases there; every process reads it
        args = engine.args
        args._api_process_count, args._api_process_rank = count, -1
        vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        sock = create_server_socket((settings.host, settings.port), reuse_port=False)
        listeners = bind_engine_zmq_listeners(vllm_config, count)
        front = Front(settings, model_path, Counts(count))
        with launch_core_engines(
            vllm_config, Executor.get_class(vllm_config), not args.disable_log_stats, listeners.addresses
        ) as launch:
            manager = APIServerProcessManager(
                listen_address=f"http://{settings.host}:{settings.port}",
                sock=sock,
                args=front,
                num_servers=count,
                input_listeners=listeners.inputs,
                output_listeners=listeners.outputs,
                target_server_fn=serve_process,
                stats_update_address=(
                    launch.coordinator.get_stats_publish_address() if launch.coordinator else None
                ),
            )
            sock.close()  # the processes hold it
            launch.watched_frontend_processes = manager.processes
            log.info("%d gateway processes on http://%s:%d", count, settings.host, settings.port)
        wait_for_completion_or_failure(manager, launch.engine_manager, launch.coordinator)
        failed = any(p.exitcode for p in manager.processes)
    except SystemExit:
        failed = False
    except Exception as exc:
        log.error("stopping: %s", exc)
    finally:
        deadline = time.monotonic() + settings.drain_timeout + STOP_GRACE_S
        if manager is not None:
            manager.shutdown(timeout=settings.drain_timeout + STOP_GRACE_S)
        if launch is not None and launch.engine_manager is not None:
            launch.engine_manager.shutdown(timeout=max(1.0, deadline - time.monotonic()))
        if launch is not None and launch.coordinator is not None:
            launch.coordinator.shutdown()
        if status is not None:
            Path(status).unlink(missing_ok=True)
    return 1 if failed else 0


def serve_process(listen_address: str, sock: Any, front: Front, client: dict[str, Any]) -> None:
    """One gateway process (vLLM's process manager starts it): the app on the shared socket, a client of the
    engine core at `client`'s addresses. Exits 0 when stopped, 1 when the start-up failed."""
    index = client["client_index"]
    set_process_title("APIServer", str(index))
    settings = front.settings
    configure_logging(settings.log_level, settings.log_format, server=f"api-server-{index}")
    front.counts.index = index
    loads = client.pop("api_server_loads", None)
    engine = VLLMEngine(settings, client=client)
    app = create_app(settings, engine, wait_for_model=False, counts=front.counts, model_path=front.model_path)
    server = FrontServer(
        connections.config(app, settings),
        app,
        settings.drain_timeout,
        peer_loads=(loads, index) if loads is not None else None,
    )
    app.state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    failed = not server.started or getattr(app.state, "startup", None) is None or app.state.startup.error
    sys.exit(1 if failed else 0)


class FrontServer(DrainingServer, NoSignalServer):
    """DrainingServer (SIGTERM drains) that accepts from the shared socket only while it is the least loaded of
    the processes (vLLM's NoSignalServer, with uvicorn's signal handling put back)."""

    capture_signals = uvicorn.Server.capture_signals

    def __init__(self, config: uvicorn.Config, app: Any, drain_timeout: float, peer_loads: Any) -> None:
        super().__init__(config, app, drain_timeout)
        self.peer_loads = peer_loads
