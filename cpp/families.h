// Each kernel family's binding lives in cpp/bind_<family>.cpp and is called from PYBIND11_MODULE in
// bindings.cpp. Those files share the argument checks in check.h.
#pragma once

#include <pybind11/pybind11.h>

// families: declarations
void bind_attention(pybind11::module_& m);
void bind_depth_decoder(pybind11::module_& m);
void bind_linear(pybind11::module_& m);
void bind_sampling(pybind11::module_& m);
