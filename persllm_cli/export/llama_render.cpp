// persllm's renderer for llama.cpp's own Jinja engine (common/jinja): renders a chat template the way
// llama-server's common_chat_template_direct_apply does, so `persllm export --check` and the tests can
// compare it byte for byte with transformers' rendering. Built by persllm_cli/export/engine.py against
// a llama.cpp source tree; this file is persllm's, the engine it links is llama.cpp's.
//
// Usage: persllm-llama-render TEMPLATE_FILE < REQUEST.json > REPLY.json
//   REQUEST: {"bos_token": S, "eos_token": S,
//             "cases": [{"messages": [...], "add_generation_prompt": B, "kwargs": {...}}, ...]}
//   REPLY:   {"caps": {...}, "results": [{"text": S} or {"error": S}, ...]}, or {"error": S} (exit 2)
//            when the template does not parse.

#include "jinja/caps.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include "json.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

// common/json.cpp asserts with GGML_ASSERT; this renderer links no ggml, so it provides the abort.
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "%s:%d: ", file, line);
    std::vfprintf(stderr, fmt, args);
    std::fprintf(stderr, "\n");
    va_end(args);
    std::abort();
}

static std::string read_all(std::istream & in) {
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// One render, as common_chat_template_direct_apply_impl builds its context: messages, bos_token,
// eos_token, enable_thinking, the chat_template_kwargs, and add_generation_prompt only when true;
// input strings marked as the server marks them. (The server then drops a leading BOS when its
// vocabulary adds one itself; that is tokenization, not the template, and is left out here.)
static std::string render(jinja::program & prog, const std::string & source, const common_json & req,
                          const common_json & c) {
    common_json inp = common_json::object();
    inp["messages"] = c.at("messages");
    inp["bos_token"] = req.value("bos_token", std::string());
    inp["eos_token"] = req.value("eos_token", std::string());
    inp["enable_thinking"] = true;
    if (c.contains("kwargs")) {
        for (const auto & [k, v] : c.at("kwargs").items()) {
            inp[k] = v;
        }
    }
    if (c.value("add_generation_prompt", false)) {
        inp["add_generation_prompt"] = true;
    }
    jinja::context ctx(source);
    jinja::global_from_json(ctx, inp, true);
    jinja::runtime runtime(ctx);
    const jinja::value results = runtime.execute(prog);
    return jinja::runtime::gather_string_parts(results)->as_string().str();
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s TEMPLATE_FILE < REQUEST.json\n", argv[0]);
        return 64;
    }
    std::ifstream file(argv[1], std::ios::binary);
    if (!file) {
        std::fprintf(stderr, "cannot read %s\n", argv[1]);
        return 66;
    }
    const std::string source = read_all(file);
    const common_json req = common_json::parse(read_all(std::cin));

    common_json reply = common_json::object();
    jinja::program prog;
    std::string src;
    try {
        jinja::lexer lexer;
        auto tokens = lexer.tokenize(source);
        prog = jinja::parse_from_tokens(tokens);
        src = tokens.source;
        // llama-server probes every template's capabilities at load; a template that fails there
        // stops the server, so the probe is part of "renders in llama.cpp".
        const jinja::caps caps = jinja::caps_get(prog);
        common_json caps_json = common_json::object();
        for (const auto & [k, v] : caps.to_map()) {
            caps_json[k] = v;
        }
        reply["caps"] = caps_json;
    } catch (const std::exception & e) {
        reply["error"] = std::string(e.what());
        std::cout << reply.dump_safe() << std::endl;
        return 2;
    }

    common_json results = common_json::array();
    for (const auto & c : req.at("cases")) {
        common_json one = common_json::object();
        try {
            one["text"] = render(prog, src, req, c);
        } catch (const std::exception & e) {
            one["error"] = std::string(e.what());
        }
        results.push_back(one);
    }
    reply["results"] = results;
    std::cout << reply.dump_safe() << std::endl;
    return 0;
}
