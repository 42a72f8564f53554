// tca_ggml — internal: no C++ exception ever leaves an extern "C" entry point of native/src.
// Not part of the C API.
//
// A C++ exception that unwinds into C (cffi, Python) ends in std::terminate: the whole Python
// process aborts. Every entry point of native/include/tca_ggml.h therefore runs its body through
// tca_guard: an exception (std::exception or anything else) is logged as an error line
// (LLAMA_LOG_ERROR, which the calling Llama's Scope keeps for its exception message), written into
// `err` when the entry point has one, and the entry point returns its documented failure value.
#pragma once

#include <cstddef>
#include <exception>
#include <utility>

void tca_report_exception(const char * fn, const char * what, char * err, size_t err_len) noexcept;

template <typename R, typename F>
R tca_guard(const char * fn, R on_error, char * err, size_t err_len, F && body) noexcept {
    try {
        return std::forward<F>(body)();
    } catch (const std::exception & e) {
        tca_report_exception(fn, e.what(), err, err_len);
    } catch (...) {
        tca_report_exception(fn, "unknown C++ exception", err, err_len);
    }
    return on_error;
}

// entry points without a result: the body runs, an exception is reported and swallowed
template <typename F>
void tca_guard_void(const char * fn, F && body) noexcept {
    try {
        std::forward<F>(body)();
    } catch (const std::exception & e) {
        tca_report_exception(fn, e.what(), nullptr, 0);
    } catch (...) {
        tca_report_exception(fn, "unknown C++ exception", nullptr, 0);
    }
}
