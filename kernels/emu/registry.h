// The kernels g++ compiled from our .cu sources, by name, each with a launcher that unpacks
// cuLaunchKernel's argument array into the kernel's parameter types.
#pragma once
#include <cstddef>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

namespace emu {
struct Kernel {
    const char* name;
    void (*run)(void** params);
    // Reaches a barrier (kernels.py): its threads run as fibers, else as plain calls.
    bool waits;
};
std::map<std::string, Kernel>& kernels();

template <typename... A, std::size_t... I>
void invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}

template <auto F>
struct Registered;
template <typename... A, void (*F)(A...)>
struct Registered<F> {
    static void run(void** p) { invoke(F, p, std::index_sequence_for<A...>{}); }
};

struct Register {
    Register(const char* name, void (*run)(void**), bool waits) {
        kernels()[name] = Kernel{name, run, waits};
    }
};
}  // namespace emu

#define EMU_KERNEL(name, waits) \
    static emu::Register emu_registered_##name(#name, &emu::Registered<&name>::run, waits);
