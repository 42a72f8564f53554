// tca_ggml — TCA retention memory and graph integration for llama.cpp: what upstream's patched
// files include (patch 0002: llama-graph.cpp, llama-model.cpp).
//
//   llama-tca-memory.{h,cpp}  the retention memory (llama_tca_memory, llama_tca_memory_create)
//   llama-tca-seqs.{h,cpp}    many sequences: one retention memory each (llama_tca_memory_seqs)
//   llama-tca-graph.cpp       the graph hooks declared here
//
// build_attn_inp_kv / build_attn dispatch to the hooks for a context whose memory is the TCA
// retention memory, so every architecture that uses the standard attention path gets TCA
// without touching its model file.
#pragma once

#include "llama-tca-memory.h"
#include "llama-tca-seqs.h"
#include "llama-graph.h"

// Graph hooks (patched into llm_graph_context::build_attn_inp_kv / build_attn): nullptr when the
// context's memory is not the TCA retention memory.
llm_graph_input_attn_kv * llama_tca_build_attn_inp(const llm_graph_context & g);
ggml_tensor * llama_tca_build_attn(const llm_graph_context & g, llm_graph_input_attn_kv * inp,
                                   ggml_tensor * wo, ggml_tensor * wo_b, ggml_tensor * wo_s,
                                   ggml_tensor * q_cur, ggml_tensor * k_cur, ggml_tensor * v_cur,
                                   ggml_tensor * kq_b, ggml_tensor * sinks, float kq_scale, int il);

// Graph nodes the hooks add beyond upstream's estimate (patched into llama_context::graph_max_nodes):
// several sequences build one attention subgraph a sequence and layer; 0 for any other memory.
uint32_t llama_tca_graph_nodes(const llama_memory_i * mem);
