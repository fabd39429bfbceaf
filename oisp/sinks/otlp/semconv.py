"""The OpenTelemetry names this sink emits, pinned to one version of the GenAI conventions.

The GenAI semantic conventions are still "development" and keep changing (they
left the main semantic-conventions repository after v1.41 for their own one,
renaming metrics on the way). This sink implements them as released in
**semantic-conventions v1.41.0** — the names the `opentelemetry-semantic-conventions`
Python package still carries, marked "moved" — and says so in every export's schema
URL, so a collector can translate when it knows a later version.
"""

from __future__ import annotations

SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

# -- attributes -----------------------------------------------------------------------------------
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_STREAM = "gen_ai.request.stream"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_TOP_K = "gen_ai.request.top_k"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
REQUEST_SEED = "gen_ai.request.seed"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
USAGE_CACHE_CREATION_INPUT_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
USAGE_REASONING_OUTPUT_TOKENS = "gen_ai.usage.reasoning.output_tokens"
TOKEN_TYPE = "gen_ai.token.type"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
TOOL_DEFINITIONS = "gen_ai.tool.definitions"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
PROCESS_PID = "process.pid"
PROCESS_PARENT_PID = "process.parent_pid"
PROCESS_EXECUTABLE_NAME = "process.executable.name"
PROCESS_EXECUTABLE_PATH = "process.executable.path"
PROCESS_COMMAND_LINE = "process.command_line"
USER_NAME = "user.name"

# -- metrics: (name, unit, bucket boundaries the conventions advise) ------------------------------
TOKEN_USAGE = ("gen_ai.client.token.usage", "{token}",
               [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864])
OPERATION_DURATION = ("gen_ai.client.operation.duration", "s",
                      [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92])
TIME_TO_FIRST_CHUNK = ("gen_ai.client.operation.time_to_first_chunk", "s",
                       [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0])

# -- values ---------------------------------------------------------------------------------------
# OISP provider ids (the spec's) → the conventions' well-known gen_ai.provider.name values;
# a provider they do not name keeps its spec id (the conventions allow a custom value).
PROVIDERS = {
    "openai": "openai", "anthropic": "anthropic", "azure_openai": "azure.ai.openai", "aws_bedrock": "aws.bedrock",
    "cohere": "cohere", "deepseek": "deepseek", "google_gemini": "gcp.gemini", "google_vertex": "gcp.vertex_ai",
    "groq": "groq", "mistral": "mistral_ai", "perplexity": "perplexity", "xai": "x_ai",
}
# OISP request types → gen_ai.operation.name; Google's generateContent has its own name.
OPERATIONS = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings"}
GENERATE_CONTENT_PROVIDERS = {"google_gemini", "google_vertex"}
# Providers whose APIs take the system prompt apart from the chat history (→ gen_ai.system_instructions).
SEPARATE_SYSTEM_PROVIDERS = {"anthropic", "aws_bedrock", "google_gemini", "google_vertex"}
