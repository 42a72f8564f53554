// tca_ggml — internal: the rules of a TCA configuration that the GGUF reader shares with the owner
// of the configuration (tca_config.cpp). Not part of the C API.
#pragma once

#include <cstdint>

// b: a power of two in [1, 4096]
bool tca_block_ok(int64_t block);
// len(k_values) for block b: log2(b) + 1 (k_values 1, 2, 4, ..., b)
uint32_t tca_n_k(uint32_t block);
