//! Metric names (Prometheus style, prefix `specula_`), one place for all of them.
//! Recorded through the `metrics` crate; install any exporter to collect them.

/// Requests in the running batch (gauge).
pub const REQUESTS_RUNNING: &str = "specula_requests_running";
/// Requests waiting for admission, preempted ones included (gauge).
pub const REQUESTS_WAITING: &str = "specula_requests_waiting";
/// KV blocks in use (gauge), labelled `pool` = `target` | `draft`.
pub const KV_BLOCKS_USED: &str = "specula_kv_blocks_used";
/// KV blocks in total (gauge), labelled like `KV_BLOCKS_USED`.
pub const KV_BLOCKS_TOTAL: &str = "specula_kv_blocks_total";
pub const POOL_LABEL: &str = "pool";
/// 1, labelled `dtype` = how the target's KV cache stores keys and values (`f32`, `bf16`,
/// `fp8_e4m3`) (gauge).
pub const KV_CACHE_INFO: &str = "specula_kv_cache_info";
pub const DTYPE_LABEL: &str = "dtype";
/// Bytes one token takes in the target's KV cache, across layers, keys and values (gauge).
pub const KV_BYTES_PER_TOKEN: &str = "specula_kv_bytes_per_token";
/// Tokens the target's KV pool holds (gauge).
pub const KV_POOL_TOKENS: &str = "specula_kv_pool_tokens";
/// The attention window in tokens, 0 without one (gauge).
pub const KV_ATTENTION_WINDOW: &str = "specula_kv_attention_window_tokens";
/// KV blocks given back to the pool because they slid out of the attention window (counter).
pub const KV_WINDOW_RECYCLED: &str = "specula_kv_window_recycled_blocks_total";
pub const POOL_TARGET: &str = "target";
pub const POOL_DRAFT: &str = "draft";
/// Prompt tokens looked up in the prefix cache (counter).
pub const PREFIX_CACHE_QUERIES: &str = "specula_prefix_cache_queries_total";
/// Prompt tokens found in the prefix cache, not computed again (counter).
pub const PREFIX_CACHE_HITS: &str = "specula_prefix_cache_hits_total";
/// Requests preempted for lack of KV blocks (counter).
pub const PREEMPTIONS: &str = "specula_preemptions_total";
/// Seconds from arrival to the first token (histogram).
pub const TIME_TO_FIRST_TOKEN: &str = "specula_time_to_first_token_seconds";
/// Seconds between consecutive token events of a request (histogram).
pub const INTER_TOKEN_LATENCY: &str = "specula_inter_token_latency_seconds";
/// Seconds per output token after the first, per finished request (histogram).
pub const TIME_PER_OUTPUT_TOKEN: &str = "specula_time_per_output_token_seconds";
/// Seconds from arrival to the last event (histogram).
pub const E2E_LATENCY: &str = "specula_e2e_request_latency_seconds";
/// Prompt tokens of finished requests (counter).
pub const PROMPT_TOKENS: &str = "specula_prompt_tokens_total";
/// Generated tokens of finished requests (counter).
pub const GENERATION_TOKENS: &str = "specula_generation_tokens_total";
/// Requests refused or failed, labelled `reason` = the error's code (`overloaded`,
/// `context_length_exceeded`, `shutting_down`, ...: `RequestError::code`) (counter).
pub const REQUESTS_FAILED: &str = "specula_requests_failed_total";
pub const REASON_LABEL: &str = "reason";
/// Forward steps run (counter).
pub const STEPS: &str = "specula_steps_total";
/// Forward steps that failed, labelled `kind` = `error` | `panic`: their requests failed and
/// the runtime served on (counter).
pub const STEP_FAILURES: &str = "specula_step_failures_total";
pub const KIND_LABEL: &str = "kind";
/// 1 while the runtime serves; 0 once its model executor failed beyond recovery, when
/// every request is refused and `/health` answers 503 (gauge).
pub const HEALTHY: &str = "specula_runtime_healthy";
/// Verifications of a row that carried drafts (counter).
pub const SPEC_DRAFTS: &str = "specula_spec_drafts_total";
/// Draft tokens verified (counter).
pub const SPEC_DRAFT_TOKENS: &str = "specula_spec_draft_tokens_total";
/// Draft tokens accepted (counter).
pub const SPEC_ACCEPTED_TOKENS: &str = "specula_spec_accepted_tokens_total";
/// Draft tokens verified at each draft position, labelled `position` (1, 2, ...) (counter).
pub const SPEC_DRAFTED_BY_POSITION: &str = "specula_spec_drafted_by_position_total";
/// Draft tokens accepted at each draft position, labelled like `SPEC_DRAFTED_BY_POSITION`:
/// the ratio of the two is the acceptance per position (counter).
pub const SPEC_ACCEPTED_BY_POSITION: &str = "specula_spec_accepted_by_position_total";
pub const POSITION_LABEL: &str = "position";
/// Drafting attempts that failed (the draft KV pool full, a device error); the rows went on
/// without drafts (counter).
pub const SPEC_DRAFT_ERRORS: &str = "specula_spec_draft_errors_total";

/// Records what the target's KV pool is (once, at start).
pub fn record_kv_cache(kv: &super::KvCacheInfo) {
    use ::metrics::gauge;
    if let Some(storage) = kv.storage {
        gauge!(KV_CACHE_INFO, DTYPE_LABEL => storage.name()).set(1.0);
    }
    gauge!(KV_BYTES_PER_TOKEN).set(kv.bytes_per_token as f64);
    gauge!(KV_POOL_TOKENS).set(kv.tokens as f64);
    gauge!(KV_ATTENTION_WINDOW).set(kv.window.map_or(0, |w| w.size()) as f64);
}
