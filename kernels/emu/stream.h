// How libcublas and libnccl count their calls in the emulated driver's statistics
// (TESSERA_EMU_STATS): the libraries are loaded separately (RTLD_LOCAL), so the driver's
// counter is looked up in the libcuda.so this process has already loaded.
#pragma once
#include <dlfcn.h>

// Counts `what` against `stream` (a handle the driver made; null: the default stream).
inline void emu_note(void* stream, const char* what) {
    using Note = void (*)(void*, const char*);
    static const Note note = [] {
        void* driver = dlopen("libcuda.so", RTLD_NOLOAD | RTLD_LAZY);
        return driver ? reinterpret_cast<Note>(dlsym(driver, "tessera_emu_note")) : nullptr;
    }();
    if (note != nullptr) { note(stream, what); }
}
