// How libcublas and libnccl count their calls in the emulated driver's statistics
// (TESSERA_EMU_STATS): the libraries are loaded separately (RTLD_LOCAL), so the driver's
// counter is looked up in the libcuda.so this process has already loaded.
#pragma once
#include <dlfcn.h>

#include <string>
#include <utility>

// A function of the driver this process has loaded, or null.
inline void* emu_driver_symbol(const char* name) {
    void* driver = dlopen("libcuda.so", RTLD_NOLOAD | RTLD_LAZY);
    return driver ? dlsym(driver, name) : nullptr;
}

// The bytes of `values`, one after another: what an op was queued with.
template <typename... T>
std::string emu_signature(const T&... values) {
    std::string out;
    (out.append(reinterpret_cast<const char*>(&values), sizeof(values)), ...);
    return out;
}

// Counts `what`, queued with `signature`, against `stream` (a handle the driver made; null:
// the default stream).
inline void emu_note(void* stream, const char* what, const std::string& signature = {}) {
    using Note = void (*)(void*, const char*, const char*, size_t);
    static const Note note = reinterpret_cast<Note>(emu_driver_symbol("tessera_emu_note"));
    if (note != nullptr) { note(stream, what, signature.data(), signature.size()); }
}

// Runs `work` in `stream`'s order: at once, or when the stream's queue reaches it where the
// driver defers the device's work (TESSERA_EMU_DEFER), or at each launch of a graph captured
// from the stream (the driver frees it with the graph).
template <typename F>
void emu_submit(void* stream, F work) {
    using Submit = void (*)(void*, void (*)(void*), void (*)(void*), void*);
    static const Submit submit = reinterpret_cast<Submit>(emu_driver_symbol("tessera_emu_submit"));
    auto* heap = new F(std::move(work));
    auto run = [](void* w) { (*static_cast<F*>(w))(); };
    auto release = [](void* w) { delete static_cast<F*>(w); };
    if (submit == nullptr) {
        run(heap);
        release(heap);
    } else {
        submit(stream, run, release, heap);
    }
}

// Runs what `stream` has queued (before a call that runs at once, such as an all-reduce
// between processes).
inline void emu_drain(void* stream) {
    using Drain = void (*)(void*);
    static const Drain drain = reinterpret_cast<Drain>(emu_driver_symbol("tessera_emu_drain"));
    if (drain != nullptr) { drain(stream); }
}
