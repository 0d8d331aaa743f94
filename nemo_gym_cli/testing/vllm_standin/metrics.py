"""The stand-in's /metrics: vLLM's gauges and counters that the rollout stack reads."""

from __future__ import annotations

from nemo_gym_cli.testing.vllm_standin.engine import Standin
from nemo_gym_cli.testing.vllm_standin.prefix_cache import BLOCK_SIZE

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what prometheus_client serves


def metrics_text(standin: Standin) -> str:
    """Prometheus text exposition format 0.0.4 with vLLM's metric names."""
    label = f'model_name="{standin.config.model}"'
    seqs = standin.config.max_num_seqs
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{label}}} {float(standin.running)}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{label}}} {float(standin.waiting)}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{label}}} {standin.running / seqs if seqs else 0.0}",
        "# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries counter",
        f"vllm:prefix_cache_queries_total{{{label}}} {float(standin.cache.queries)}",
        "# HELP vllm:prefix_cache_hits Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits counter",
        f"vllm:prefix_cache_hits_total{{{label}}} {float(standin.cache.hits)}",
        "# HELP vllm:num_preemptions Cumulative number of preemptions from the engine.",
        "# TYPE vllm:num_preemptions counter",
        f"vllm:num_preemptions_total{{{label}}} 0.0",
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{BLOCK_SIZE}",enable_prefix_caching="{standin.config.prefix_caching}"}} 1.0',
        "# HELP vllm:request_success Count of successfully processed requests.",
        "# TYPE vllm:request_success counter",
    ]
    for reason, count in standin.success.items():
        lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{label}}} {float(count)}')
    lines += [
        "# HELP standin_requests Chat completions and responses requests received by the stand-in.",
        "# TYPE standin_requests counter",
        f"standin_requests_total{{{label}}} {float(standin.counts['chat'] + standin.counts['responses'])}",
    ]
    return "\n".join(lines) + "\n"
