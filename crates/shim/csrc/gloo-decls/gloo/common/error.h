// See rendezvous/store.h: the gloo names ProcessGroupGloo.hpp needs.
#pragma once
#include <gloo/rendezvous/store.h>
