"""Bench-only environment (bench/replicas.py): simple_weather whose /verify burns a fixed amount
of CPU, like an environment that grades in-process (math checking, code tests)."""

import time
from dataclasses import dataclass

from nemo_gym_cli.serving import ServerConfig
from resources_servers.simple_weather.app import SimpleWeatherResourcesServer
from nemo_gym_cli.serving import route


@dataclass(kw_only=True)
class CPUWeatherConfig(ServerConfig):
    verify_cpu_ms: float = 2.0  # CPU time (not wall time) each /verify spends computing


class CPUWeatherResourcesServer(SimpleWeatherResourcesServer):
    config_type = CPUWeatherConfig

    @route("/verify")
    async def verify(self, body, ctx):
        # Busy on this process's own CPU clock: the same work however loaded the machine is.
        until = time.thread_time() + self.config.verify_cpu_ms / 1000
        while time.thread_time() < until:
            pass
        return {**body, "reward": 1.0}
