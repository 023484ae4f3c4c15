// The kernels g++ compiled from our .cu sources, by name, each with a launcher that unpacks
// cuLaunchKernel's argument array into the kernel's parameter types.
#pragma once
#include <cstddef>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace emu {
// A launch's arguments copied out of cuLaunchKernel's array, for a launch run later
// (TESSERA_EMU_DEFER): the caller's values may be gone by then, as on a GPU.
struct Bound {
    virtual ~Bound() = default;
    virtual void** params() = 0;
    // The arguments' bytes, one after another (TESSERA_EMU_STATS compares launches by them).
    virtual std::string bytes() const = 0;
};

struct Kernel {
    const char* name;
    void (*run)(void** params);
    // Reaches a barrier (kernels.py): its threads run as fibers, else as plain calls.
    bool waits;
    Bound* (*bind)(void** params);
};

template <typename T>
using Value = std::remove_cv_t<std::remove_reference_t<T>>;

template <typename... A>
struct BoundArgs : Bound {
    std::tuple<Value<A>...> values;
    void* pointers[sizeof...(A) + 1];
    explicit BoundArgs(std::tuple<Value<A>...> v) : values(std::move(v)) {}
    void** params() override { return pointers; }
    std::string bytes() const override {
        std::string out;
        std::apply([&](const auto&... v) {
            (out.append(reinterpret_cast<const char*>(&v), sizeof(v)), ...);
        }, values);
        return out;
    }
};

template <typename... A, std::size_t... I>
Bound* bind_args(void** p, std::index_sequence<I...>) {
    auto* b = new BoundArgs<A...>(std::make_tuple(*static_cast<Value<A>*>(p[I])...));
    ((b->pointers[I] = &std::get<I>(b->values)), ...);
    return b;
}
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
    static Bound* bind(void** p) { return bind_args<A...>(p, std::index_sequence_for<A...>{}); }
};

struct Register {
    Register(const char* name, void (*run)(void**), bool waits, Bound* (*bind)(void**)) {
        kernels()[name] = Kernel{name, run, waits, bind};
    }
};
}  // namespace emu

#define EMU_KERNEL(name, waits)                                                             \
    static emu::Register emu_registered_##name(#name, &emu::Registered<&name>::run, waits, \
                                               &emu::Registered<&name>::bind);
