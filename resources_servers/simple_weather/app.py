"""The weather environment: one tool, and every episode is rewarded (as in NeMo Gym)."""

from nemo_gym_cli.serving import SimpleResourcesServer, require, route


class SimpleWeatherResourcesServer(SimpleResourcesServer):
    @route("/get_weather")
    async def get_weather(self, body, ctx):
        city = require(body, "city", str, where="get_weather arguments")
        return {"city": city, "weather_description": f"The weather in {city} is cold."}

    @route("/verify")
    async def verify(self, body, ctx):
        return {**body, "reward": 1.0}
