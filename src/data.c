/* ==== kmed_data: source readers, cleaning, dedup, decontamination, formatting, packing ==== */

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- Unicode tables (generated from Python's unicodedata; only the C is kept) ---- */

/* Canonical compositions (base, mark, composed), sorted by base then mark: Latin,
   Greek, Cyrillic and kana primary composites from UnicodeData 14.0.0. */
static const uint16_t kmed__data_comp[][3] = {
    {0x41,0x300,0xC0}, {0x41,0x301,0xC1}, {0x41,0x302,0xC2}, {0x41,0x303,0xC3}, {0x41,0x304,0x100},
    {0x41,0x306,0x102}, {0x41,0x307,0x226}, {0x41,0x308,0xC4}, {0x41,0x309,0x1EA2},
    {0x41,0x30A,0xC5}, {0x41,0x30C,0x1CD}, {0x41,0x30F,0x200}, {0x41,0x311,0x202},
    {0x41,0x323,0x1EA0}, {0x41,0x325,0x1E00}, {0x41,0x328,0x104}, {0x42,0x307,0x1E02},
    {0x42,0x323,0x1E04}, {0x42,0x331,0x1E06}, {0x43,0x301,0x106}, {0x43,0x302,0x108},
    {0x43,0x307,0x10A}, {0x43,0x30C,0x10C}, {0x43,0x327,0xC7}, {0x44,0x307,0x1E0A},
    {0x44,0x30C,0x10E}, {0x44,0x323,0x1E0C}, {0x44,0x327,0x1E10}, {0x44,0x32D,0x1E12},
    {0x44,0x331,0x1E0E}, {0x45,0x300,0xC8}, {0x45,0x301,0xC9}, {0x45,0x302,0xCA},
    {0x45,0x303,0x1EBC}, {0x45,0x304,0x112}, {0x45,0x306,0x114}, {0x45,0x307,0x116},
    {0x45,0x308,0xCB}, {0x45,0x309,0x1EBA}, {0x45,0x30C,0x11A}, {0x45,0x30F,0x204},
    {0x45,0x311,0x206}, {0x45,0x323,0x1EB8}, {0x45,0x327,0x228}, {0x45,0x328,0x118},
    {0x45,0x32D,0x1E18}, {0x45,0x330,0x1E1A}, {0x46,0x307,0x1E1E}, {0x47,0x301,0x1F4},
    {0x47,0x302,0x11C}, {0x47,0x304,0x1E20}, {0x47,0x306,0x11E}, {0x47,0x307,0x120},
    {0x47,0x30C,0x1E6}, {0x47,0x327,0x122}, {0x48,0x302,0x124}, {0x48,0x307,0x1E22},
    {0x48,0x308,0x1E26}, {0x48,0x30C,0x21E}, {0x48,0x323,0x1E24}, {0x48,0x327,0x1E28},
    {0x48,0x32E,0x1E2A}, {0x49,0x300,0xCC}, {0x49,0x301,0xCD}, {0x49,0x302,0xCE},
    {0x49,0x303,0x128}, {0x49,0x304,0x12A}, {0x49,0x306,0x12C}, {0x49,0x307,0x130},
    {0x49,0x308,0xCF}, {0x49,0x309,0x1EC8}, {0x49,0x30C,0x1CF}, {0x49,0x30F,0x208},
    {0x49,0x311,0x20A}, {0x49,0x323,0x1ECA}, {0x49,0x328,0x12E}, {0x49,0x330,0x1E2C},
    {0x4A,0x302,0x134}, {0x4B,0x301,0x1E30}, {0x4B,0x30C,0x1E8}, {0x4B,0x323,0x1E32},
    {0x4B,0x327,0x136}, {0x4B,0x331,0x1E34}, {0x4C,0x301,0x139}, {0x4C,0x30C,0x13D},
    {0x4C,0x323,0x1E36}, {0x4C,0x327,0x13B}, {0x4C,0x32D,0x1E3C}, {0x4C,0x331,0x1E3A},
    {0x4D,0x301,0x1E3E}, {0x4D,0x307,0x1E40}, {0x4D,0x323,0x1E42}, {0x4E,0x300,0x1F8},
    {0x4E,0x301,0x143}, {0x4E,0x303,0xD1}, {0x4E,0x307,0x1E44}, {0x4E,0x30C,0x147},
    {0x4E,0x323,0x1E46}, {0x4E,0x327,0x145}, {0x4E,0x32D,0x1E4A}, {0x4E,0x331,0x1E48},
    {0x4F,0x300,0xD2}, {0x4F,0x301,0xD3}, {0x4F,0x302,0xD4}, {0x4F,0x303,0xD5}, {0x4F,0x304,0x14C},
    {0x4F,0x306,0x14E}, {0x4F,0x307,0x22E}, {0x4F,0x308,0xD6}, {0x4F,0x309,0x1ECE},
    {0x4F,0x30B,0x150}, {0x4F,0x30C,0x1D1}, {0x4F,0x30F,0x20C}, {0x4F,0x311,0x20E},
    {0x4F,0x31B,0x1A0}, {0x4F,0x323,0x1ECC}, {0x4F,0x328,0x1EA}, {0x50,0x301,0x1E54},
    {0x50,0x307,0x1E56}, {0x52,0x301,0x154}, {0x52,0x307,0x1E58}, {0x52,0x30C,0x158},
    {0x52,0x30F,0x210}, {0x52,0x311,0x212}, {0x52,0x323,0x1E5A}, {0x52,0x327,0x156},
    {0x52,0x331,0x1E5E}, {0x53,0x301,0x15A}, {0x53,0x302,0x15C}, {0x53,0x307,0x1E60},
    {0x53,0x30C,0x160}, {0x53,0x323,0x1E62}, {0x53,0x326,0x218}, {0x53,0x327,0x15E},
    {0x54,0x307,0x1E6A}, {0x54,0x30C,0x164}, {0x54,0x323,0x1E6C}, {0x54,0x326,0x21A},
    {0x54,0x327,0x162}, {0x54,0x32D,0x1E70}, {0x54,0x331,0x1E6E}, {0x55,0x300,0xD9},
    {0x55,0x301,0xDA}, {0x55,0x302,0xDB}, {0x55,0x303,0x168}, {0x55,0x304,0x16A},
    {0x55,0x306,0x16C}, {0x55,0x308,0xDC}, {0x55,0x309,0x1EE6}, {0x55,0x30A,0x16E},
    {0x55,0x30B,0x170}, {0x55,0x30C,0x1D3}, {0x55,0x30F,0x214}, {0x55,0x311,0x216},
    {0x55,0x31B,0x1AF}, {0x55,0x323,0x1EE4}, {0x55,0x324,0x1E72}, {0x55,0x328,0x172},
    {0x55,0x32D,0x1E76}, {0x55,0x330,0x1E74}, {0x56,0x303,0x1E7C}, {0x56,0x323,0x1E7E},
    {0x57,0x300,0x1E80}, {0x57,0x301,0x1E82}, {0x57,0x302,0x174}, {0x57,0x307,0x1E86},
    {0x57,0x308,0x1E84}, {0x57,0x323,0x1E88}, {0x58,0x307,0x1E8A}, {0x58,0x308,0x1E8C},
    {0x59,0x300,0x1EF2}, {0x59,0x301,0xDD}, {0x59,0x302,0x176}, {0x59,0x303,0x1EF8},
    {0x59,0x304,0x232}, {0x59,0x307,0x1E8E}, {0x59,0x308,0x178}, {0x59,0x309,0x1EF6},
    {0x59,0x323,0x1EF4}, {0x5A,0x301,0x179}, {0x5A,0x302,0x1E90}, {0x5A,0x307,0x17B},
    {0x5A,0x30C,0x17D}, {0x5A,0x323,0x1E92}, {0x5A,0x331,0x1E94}, {0x61,0x300,0xE0},
    {0x61,0x301,0xE1}, {0x61,0x302,0xE2}, {0x61,0x303,0xE3}, {0x61,0x304,0x101},
    {0x61,0x306,0x103}, {0x61,0x307,0x227}, {0x61,0x308,0xE4}, {0x61,0x309,0x1EA3},
    {0x61,0x30A,0xE5}, {0x61,0x30C,0x1CE}, {0x61,0x30F,0x201}, {0x61,0x311,0x203},
    {0x61,0x323,0x1EA1}, {0x61,0x325,0x1E01}, {0x61,0x328,0x105}, {0x62,0x307,0x1E03},
    {0x62,0x323,0x1E05}, {0x62,0x331,0x1E07}, {0x63,0x301,0x107}, {0x63,0x302,0x109},
    {0x63,0x307,0x10B}, {0x63,0x30C,0x10D}, {0x63,0x327,0xE7}, {0x64,0x307,0x1E0B},
    {0x64,0x30C,0x10F}, {0x64,0x323,0x1E0D}, {0x64,0x327,0x1E11}, {0x64,0x32D,0x1E13},
    {0x64,0x331,0x1E0F}, {0x65,0x300,0xE8}, {0x65,0x301,0xE9}, {0x65,0x302,0xEA},
    {0x65,0x303,0x1EBD}, {0x65,0x304,0x113}, {0x65,0x306,0x115}, {0x65,0x307,0x117},
    {0x65,0x308,0xEB}, {0x65,0x309,0x1EBB}, {0x65,0x30C,0x11B}, {0x65,0x30F,0x205},
    {0x65,0x311,0x207}, {0x65,0x323,0x1EB9}, {0x65,0x327,0x229}, {0x65,0x328,0x119},
    {0x65,0x32D,0x1E19}, {0x65,0x330,0x1E1B}, {0x66,0x307,0x1E1F}, {0x67,0x301,0x1F5},
    {0x67,0x302,0x11D}, {0x67,0x304,0x1E21}, {0x67,0x306,0x11F}, {0x67,0x307,0x121},
    {0x67,0x30C,0x1E7}, {0x67,0x327,0x123}, {0x68,0x302,0x125}, {0x68,0x307,0x1E23},
    {0x68,0x308,0x1E27}, {0x68,0x30C,0x21F}, {0x68,0x323,0x1E25}, {0x68,0x327,0x1E29},
    {0x68,0x32E,0x1E2B}, {0x68,0x331,0x1E96}, {0x69,0x300,0xEC}, {0x69,0x301,0xED},
    {0x69,0x302,0xEE}, {0x69,0x303,0x129}, {0x69,0x304,0x12B}, {0x69,0x306,0x12D},
    {0x69,0x308,0xEF}, {0x69,0x309,0x1EC9}, {0x69,0x30C,0x1D0}, {0x69,0x30F,0x209},
    {0x69,0x311,0x20B}, {0x69,0x323,0x1ECB}, {0x69,0x328,0x12F}, {0x69,0x330,0x1E2D},
    {0x6A,0x302,0x135}, {0x6A,0x30C,0x1F0}, {0x6B,0x301,0x1E31}, {0x6B,0x30C,0x1E9},
    {0x6B,0x323,0x1E33}, {0x6B,0x327,0x137}, {0x6B,0x331,0x1E35}, {0x6C,0x301,0x13A},
    {0x6C,0x30C,0x13E}, {0x6C,0x323,0x1E37}, {0x6C,0x327,0x13C}, {0x6C,0x32D,0x1E3D},
    {0x6C,0x331,0x1E3B}, {0x6D,0x301,0x1E3F}, {0x6D,0x307,0x1E41}, {0x6D,0x323,0x1E43},
    {0x6E,0x300,0x1F9}, {0x6E,0x301,0x144}, {0x6E,0x303,0xF1}, {0x6E,0x307,0x1E45},
    {0x6E,0x30C,0x148}, {0x6E,0x323,0x1E47}, {0x6E,0x327,0x146}, {0x6E,0x32D,0x1E4B},
    {0x6E,0x331,0x1E49}, {0x6F,0x300,0xF2}, {0x6F,0x301,0xF3}, {0x6F,0x302,0xF4},
    {0x6F,0x303,0xF5}, {0x6F,0x304,0x14D}, {0x6F,0x306,0x14F}, {0x6F,0x307,0x22F},
    {0x6F,0x308,0xF6}, {0x6F,0x309,0x1ECF}, {0x6F,0x30B,0x151}, {0x6F,0x30C,0x1D2},
    {0x6F,0x30F,0x20D}, {0x6F,0x311,0x20F}, {0x6F,0x31B,0x1A1}, {0x6F,0x323,0x1ECD},
    {0x6F,0x328,0x1EB}, {0x70,0x301,0x1E55}, {0x70,0x307,0x1E57}, {0x72,0x301,0x155},
    {0x72,0x307,0x1E59}, {0x72,0x30C,0x159}, {0x72,0x30F,0x211}, {0x72,0x311,0x213},
    {0x72,0x323,0x1E5B}, {0x72,0x327,0x157}, {0x72,0x331,0x1E5F}, {0x73,0x301,0x15B},
    {0x73,0x302,0x15D}, {0x73,0x307,0x1E61}, {0x73,0x30C,0x161}, {0x73,0x323,0x1E63},
    {0x73,0x326,0x219}, {0x73,0x327,0x15F}, {0x74,0x307,0x1E6B}, {0x74,0x308,0x1E97},
    {0x74,0x30C,0x165}, {0x74,0x323,0x1E6D}, {0x74,0x326,0x21B}, {0x74,0x327,0x163},
    {0x74,0x32D,0x1E71}, {0x74,0x331,0x1E6F}, {0x75,0x300,0xF9}, {0x75,0x301,0xFA},
    {0x75,0x302,0xFB}, {0x75,0x303,0x169}, {0x75,0x304,0x16B}, {0x75,0x306,0x16D},
    {0x75,0x308,0xFC}, {0x75,0x309,0x1EE7}, {0x75,0x30A,0x16F}, {0x75,0x30B,0x171},
    {0x75,0x30C,0x1D4}, {0x75,0x30F,0x215}, {0x75,0x311,0x217}, {0x75,0x31B,0x1B0},
    {0x75,0x323,0x1EE5}, {0x75,0x324,0x1E73}, {0x75,0x328,0x173}, {0x75,0x32D,0x1E77},
    {0x75,0x330,0x1E75}, {0x76,0x303,0x1E7D}, {0x76,0x323,0x1E7F}, {0x77,0x300,0x1E81},
    {0x77,0x301,0x1E83}, {0x77,0x302,0x175}, {0x77,0x307,0x1E87}, {0x77,0x308,0x1E85},
    {0x77,0x30A,0x1E98}, {0x77,0x323,0x1E89}, {0x78,0x307,0x1E8B}, {0x78,0x308,0x1E8D},
    {0x79,0x300,0x1EF3}, {0x79,0x301,0xFD}, {0x79,0x302,0x177}, {0x79,0x303,0x1EF9},
    {0x79,0x304,0x233}, {0x79,0x307,0x1E8F}, {0x79,0x308,0xFF}, {0x79,0x309,0x1EF7},
    {0x79,0x30A,0x1E99}, {0x79,0x323,0x1EF5}, {0x7A,0x301,0x17A}, {0x7A,0x302,0x1E91},
    {0x7A,0x307,0x17C}, {0x7A,0x30C,0x17E}, {0x7A,0x323,0x1E93}, {0x7A,0x331,0x1E95},
    {0xA8,0x301,0x385}, {0xC2,0x300,0x1EA6}, {0xC2,0x301,0x1EA4}, {0xC2,0x303,0x1EAA},
    {0xC2,0x309,0x1EA8}, {0xC4,0x304,0x1DE}, {0xC5,0x301,0x1FA}, {0xC6,0x301,0x1FC},
    {0xC6,0x304,0x1E2}, {0xC7,0x301,0x1E08}, {0xCA,0x300,0x1EC0}, {0xCA,0x301,0x1EBE},
    {0xCA,0x303,0x1EC4}, {0xCA,0x309,0x1EC2}, {0xCF,0x301,0x1E2E}, {0xD4,0x300,0x1ED2},
    {0xD4,0x301,0x1ED0}, {0xD4,0x303,0x1ED6}, {0xD4,0x309,0x1ED4}, {0xD5,0x301,0x1E4C},
    {0xD5,0x304,0x22C}, {0xD5,0x308,0x1E4E}, {0xD6,0x304,0x22A}, {0xD8,0x301,0x1FE},
    {0xDC,0x300,0x1DB}, {0xDC,0x301,0x1D7}, {0xDC,0x304,0x1D5}, {0xDC,0x30C,0x1D9},
    {0xE2,0x300,0x1EA7}, {0xE2,0x301,0x1EA5}, {0xE2,0x303,0x1EAB}, {0xE2,0x309,0x1EA9},
    {0xE4,0x304,0x1DF}, {0xE5,0x301,0x1FB}, {0xE6,0x301,0x1FD}, {0xE6,0x304,0x1E3},
    {0xE7,0x301,0x1E09}, {0xEA,0x300,0x1EC1}, {0xEA,0x301,0x1EBF}, {0xEA,0x303,0x1EC5},
    {0xEA,0x309,0x1EC3}, {0xEF,0x301,0x1E2F}, {0xF4,0x300,0x1ED3}, {0xF4,0x301,0x1ED1},
    {0xF4,0x303,0x1ED7}, {0xF4,0x309,0x1ED5}, {0xF5,0x301,0x1E4D}, {0xF5,0x304,0x22D},
    {0xF5,0x308,0x1E4F}, {0xF6,0x304,0x22B}, {0xF8,0x301,0x1FF}, {0xFC,0x300,0x1DC},
    {0xFC,0x301,0x1D8}, {0xFC,0x304,0x1D6}, {0xFC,0x30C,0x1DA}, {0x102,0x300,0x1EB0},
    {0x102,0x301,0x1EAE}, {0x102,0x303,0x1EB4}, {0x102,0x309,0x1EB2}, {0x103,0x300,0x1EB1},
    {0x103,0x301,0x1EAF}, {0x103,0x303,0x1EB5}, {0x103,0x309,0x1EB3}, {0x112,0x300,0x1E14},
    {0x112,0x301,0x1E16}, {0x113,0x300,0x1E15}, {0x113,0x301,0x1E17}, {0x14C,0x300,0x1E50},
    {0x14C,0x301,0x1E52}, {0x14D,0x300,0x1E51}, {0x14D,0x301,0x1E53}, {0x15A,0x307,0x1E64},
    {0x15B,0x307,0x1E65}, {0x160,0x307,0x1E66}, {0x161,0x307,0x1E67}, {0x168,0x301,0x1E78},
    {0x169,0x301,0x1E79}, {0x16A,0x308,0x1E7A}, {0x16B,0x308,0x1E7B}, {0x17F,0x307,0x1E9B},
    {0x1A0,0x300,0x1EDC}, {0x1A0,0x301,0x1EDA}, {0x1A0,0x303,0x1EE0}, {0x1A0,0x309,0x1EDE},
    {0x1A0,0x323,0x1EE2}, {0x1A1,0x300,0x1EDD}, {0x1A1,0x301,0x1EDB}, {0x1A1,0x303,0x1EE1},
    {0x1A1,0x309,0x1EDF}, {0x1A1,0x323,0x1EE3}, {0x1AF,0x300,0x1EEA}, {0x1AF,0x301,0x1EE8},
    {0x1AF,0x303,0x1EEE}, {0x1AF,0x309,0x1EEC}, {0x1AF,0x323,0x1EF0}, {0x1B0,0x300,0x1EEB},
    {0x1B0,0x301,0x1EE9}, {0x1B0,0x303,0x1EEF}, {0x1B0,0x309,0x1EED}, {0x1B0,0x323,0x1EF1},
    {0x1B7,0x30C,0x1EE}, {0x1EA,0x304,0x1EC}, {0x1EB,0x304,0x1ED}, {0x226,0x304,0x1E0},
    {0x227,0x304,0x1E1}, {0x228,0x306,0x1E1C}, {0x229,0x306,0x1E1D}, {0x22E,0x304,0x230},
    {0x22F,0x304,0x231}, {0x292,0x30C,0x1EF}, {0x391,0x301,0x386}, {0x395,0x301,0x388},
    {0x397,0x301,0x389}, {0x399,0x301,0x38A}, {0x399,0x308,0x3AA}, {0x39F,0x301,0x38C},
    {0x3A5,0x301,0x38E}, {0x3A5,0x308,0x3AB}, {0x3A9,0x301,0x38F}, {0x3B1,0x301,0x3AC},
    {0x3B5,0x301,0x3AD}, {0x3B7,0x301,0x3AE}, {0x3B9,0x301,0x3AF}, {0x3B9,0x308,0x3CA},
    {0x3BF,0x301,0x3CC}, {0x3C5,0x301,0x3CD}, {0x3C5,0x308,0x3CB}, {0x3C9,0x301,0x3CE},
    {0x3CA,0x301,0x390}, {0x3CB,0x301,0x3B0}, {0x3D2,0x301,0x3D3}, {0x3D2,0x308,0x3D4},
    {0x406,0x308,0x407}, {0x410,0x306,0x4D0}, {0x410,0x308,0x4D2}, {0x413,0x301,0x403},
    {0x415,0x300,0x400}, {0x415,0x306,0x4D6}, {0x415,0x308,0x401}, {0x416,0x306,0x4C1},
    {0x416,0x308,0x4DC}, {0x417,0x308,0x4DE}, {0x418,0x300,0x40D}, {0x418,0x304,0x4E2},
    {0x418,0x306,0x419}, {0x418,0x308,0x4E4}, {0x41A,0x301,0x40C}, {0x41E,0x308,0x4E6},
    {0x423,0x304,0x4EE}, {0x423,0x306,0x40E}, {0x423,0x308,0x4F0}, {0x423,0x30B,0x4F2},
    {0x427,0x308,0x4F4}, {0x42B,0x308,0x4F8}, {0x42D,0x308,0x4EC}, {0x430,0x306,0x4D1},
    {0x430,0x308,0x4D3}, {0x433,0x301,0x453}, {0x435,0x300,0x450}, {0x435,0x306,0x4D7},
    {0x435,0x308,0x451}, {0x436,0x306,0x4C2}, {0x436,0x308,0x4DD}, {0x437,0x308,0x4DF},
    {0x438,0x300,0x45D}, {0x438,0x304,0x4E3}, {0x438,0x306,0x439}, {0x438,0x308,0x4E5},
    {0x43A,0x301,0x45C}, {0x43E,0x308,0x4E7}, {0x443,0x304,0x4EF}, {0x443,0x306,0x45E},
    {0x443,0x308,0x4F1}, {0x443,0x30B,0x4F3}, {0x447,0x308,0x4F5}, {0x44B,0x308,0x4F9},
    {0x44D,0x308,0x4ED}, {0x456,0x308,0x457}, {0x474,0x30F,0x476}, {0x475,0x30F,0x477},
    {0x4D8,0x308,0x4DA}, {0x4D9,0x308,0x4DB}, {0x4E8,0x308,0x4EA}, {0x4E9,0x308,0x4EB},
    {0x1E36,0x304,0x1E38}, {0x1E37,0x304,0x1E39}, {0x1E5A,0x304,0x1E5C}, {0x1E5B,0x304,0x1E5D},
    {0x1E62,0x307,0x1E68}, {0x1E63,0x307,0x1E69}, {0x1EA0,0x302,0x1EAC}, {0x1EA0,0x306,0x1EB6},
    {0x1EA1,0x302,0x1EAD}, {0x1EA1,0x306,0x1EB7}, {0x1EB8,0x302,0x1EC6}, {0x1EB9,0x302,0x1EC7},
    {0x1ECC,0x302,0x1ED8}, {0x1ECD,0x302,0x1ED9}, {0x3046,0x3099,0x3094}, {0x304B,0x3099,0x304C},
    {0x304D,0x3099,0x304E}, {0x304F,0x3099,0x3050}, {0x3051,0x3099,0x3052}, {0x3053,0x3099,0x3054},
    {0x3055,0x3099,0x3056}, {0x3057,0x3099,0x3058}, {0x3059,0x3099,0x305A}, {0x305B,0x3099,0x305C},
    {0x305D,0x3099,0x305E}, {0x305F,0x3099,0x3060}, {0x3061,0x3099,0x3062}, {0x3064,0x3099,0x3065},
    {0x3066,0x3099,0x3067}, {0x3068,0x3099,0x3069}, {0x306F,0x3099,0x3070}, {0x306F,0x309A,0x3071},
    {0x3072,0x3099,0x3073}, {0x3072,0x309A,0x3074}, {0x3075,0x3099,0x3076}, {0x3075,0x309A,0x3077},
    {0x3078,0x3099,0x3079}, {0x3078,0x309A,0x307A}, {0x307B,0x3099,0x307C}, {0x307B,0x309A,0x307D},
    {0x309D,0x3099,0x309E}, {0x30A6,0x3099,0x30F4}, {0x30AB,0x3099,0x30AC}, {0x30AD,0x3099,0x30AE},
    {0x30AF,0x3099,0x30B0}, {0x30B1,0x3099,0x30B2}, {0x30B3,0x3099,0x30B4}, {0x30B5,0x3099,0x30B6},
    {0x30B7,0x3099,0x30B8}, {0x30B9,0x3099,0x30BA}, {0x30BB,0x3099,0x30BC}, {0x30BD,0x3099,0x30BE},
    {0x30BF,0x3099,0x30C0}, {0x30C1,0x3099,0x30C2}, {0x30C4,0x3099,0x30C5}, {0x30C6,0x3099,0x30C7},
    {0x30C8,0x3099,0x30C9}, {0x30CF,0x3099,0x30D0}, {0x30CF,0x309A,0x30D1}, {0x30D2,0x3099,0x30D3},
    {0x30D2,0x309A,0x30D4}, {0x30D5,0x3099,0x30D6}, {0x30D5,0x309A,0x30D7}, {0x30D8,0x3099,0x30D9},
    {0x30D8,0x309A,0x30DA}, {0x30DB,0x3099,0x30DC}, {0x30DB,0x309A,0x30DD}, {0x30EF,0x3099,0x30F7},
    {0x30F0,0x3099,0x30F8}, {0x30F1,0x3099,0x30F9}, {0x30F2,0x3099,0x30FA}, {0x30FD,0x3099,0x30FE},
};
/* Canonical singletons outside the CJK compatibility block (from, to). */
static const uint16_t kmed__data_single[][2] = {
    {0x340,0x300}, {0x341,0x301}, {0x343,0x313}, {0x374,0x2B9}, {0x37E,0x3B}, {0x387,0xB7},
    {0x1F71,0x3AC}, {0x1F73,0x3AD}, {0x1F75,0x3AE}, {0x1F77,0x3AF}, {0x1F79,0x3CC}, {0x1F7B,0x3CD},
    {0x1F7D,0x3CE}, {0x1FBB,0x386}, {0x1FBE,0x3B9}, {0x1FC9,0x388}, {0x1FCB,0x389}, {0x1FD3,0x390},
    {0x1FDB,0x38A}, {0x1FE3,0x3B0}, {0x1FEB,0x38E}, {0x1FEE,0x385}, {0x1FEF,0x60}, {0x1FF9,0x38C},
    {0x1FFB,0x38F}, {0x1FFD,0xB4}, {0x2000,0x2002}, {0x2001,0x2003}, {0x2126,0x3A9}, {0x212A,0x4B},
    {0x212B,0xC5}, {0x2329,0x3008}, {0x232A,0x3009},
};
/* CJK compatibility ideographs U+F900..U+FAD9 -> unified ideograph (0: none). */
static const uint32_t kmed__data_cjk_compat[0x1DA] = {
    0x8C48, 0x66F4, 0x8ECA, 0x8CC8, 0x6ED1, 0x4E32, 0x53E5, 0x9F9C, 0x9F9C, 0x5951, 0x91D1, 0x5587,
    0x5948, 0x61F6, 0x7669, 0x7F85, 0x863F, 0x87BA, 0x88F8, 0x908F, 0x6A02, 0x6D1B, 0x70D9, 0x73DE,
    0x843D, 0x916A, 0x99F1, 0x4E82, 0x5375, 0x6B04, 0x721B, 0x862D, 0x9E1E, 0x5D50, 0x6FEB, 0x85CD,
    0x8964, 0x62C9, 0x81D8, 0x881F, 0x5ECA, 0x6717, 0x6D6A, 0x72FC, 0x90CE, 0x4F86, 0x51B7, 0x52DE,
    0x64C4, 0x6AD3, 0x7210, 0x76E7, 0x8001, 0x8606, 0x865C, 0x8DEF, 0x9732, 0x9B6F, 0x9DFA, 0x788C,
    0x797F, 0x7DA0, 0x83C9, 0x9304, 0x9E7F, 0x8AD6, 0x58DF, 0x5F04, 0x7C60, 0x807E, 0x7262, 0x78CA,
    0x8CC2, 0x96F7, 0x58D8, 0x5C62, 0x6A13, 0x6DDA, 0x6F0F, 0x7D2F, 0x7E37, 0x964B, 0x52D2, 0x808B,
    0x51DC, 0x51CC, 0x7A1C, 0x7DBE, 0x83F1, 0x9675, 0x8B80, 0x62CF, 0x6A02, 0x8AFE, 0x4E39, 0x5BE7,
    0x6012, 0x7387, 0x7570, 0x5317, 0x78FB, 0x4FBF, 0x5FA9, 0x4E0D, 0x6CCC, 0x6578, 0x7D22, 0x53C3,
    0x585E, 0x7701, 0x8449, 0x8AAA, 0x6BBA, 0x8FB0, 0x6C88, 0x62FE, 0x82E5, 0x63A0, 0x7565, 0x4EAE,
    0x5169, 0x51C9, 0x6881, 0x7CE7, 0x826F, 0x8AD2, 0x91CF, 0x52F5, 0x5442, 0x5973, 0x5EEC, 0x65C5,
    0x6FFE, 0x792A, 0x95AD, 0x9A6A, 0x9E97, 0x9ECE, 0x529B, 0x66C6, 0x6B77, 0x8F62, 0x5E74, 0x6190,
    0x6200, 0x649A, 0x6F23, 0x7149, 0x7489, 0x79CA, 0x7DF4, 0x806F, 0x8F26, 0x84EE, 0x9023, 0x934A,
    0x5217, 0x52A3, 0x54BD, 0x70C8, 0x88C2, 0x8AAA, 0x5EC9, 0x5FF5, 0x637B, 0x6BAE, 0x7C3E, 0x7375,
    0x4EE4, 0x56F9, 0x5BE7, 0x5DBA, 0x601C, 0x73B2, 0x7469, 0x7F9A, 0x8046, 0x9234, 0x96F6, 0x9748,
    0x9818, 0x4F8B, 0x79AE, 0x91B4, 0x96B8, 0x60E1, 0x4E86, 0x50DA, 0x5BEE, 0x5C3F, 0x6599, 0x6A02,
    0x71CE, 0x7642, 0x84FC, 0x907C, 0x9F8D, 0x6688, 0x962E, 0x5289, 0x677B, 0x67F3, 0x6D41, 0x6E9C,
    0x7409, 0x7559, 0x786B, 0x7D10, 0x985E, 0x516D, 0x622E, 0x9678, 0x502B, 0x5D19, 0x6DEA, 0x8F2A,
    0x5F8B, 0x6144, 0x6817, 0x7387, 0x9686, 0x5229, 0x540F, 0x5C65, 0x6613, 0x674E, 0x68A8, 0x6CE5,
    0x7406, 0x75E2, 0x7F79, 0x88CF, 0x88E1, 0x91CC, 0x96E2, 0x533F, 0x6EBA, 0x541D, 0x71D0, 0x7498,
    0x85FA, 0x96A3, 0x9C57, 0x9E9F, 0x6797, 0x6DCB, 0x81E8, 0x7ACB, 0x7B20, 0x7C92, 0x72C0, 0x7099,
    0x8B58, 0x4EC0, 0x8336, 0x523A, 0x5207, 0x5EA6, 0x62D3, 0x7CD6, 0x5B85, 0x6D1E, 0x66B4, 0x8F3B,
    0x884C, 0x964D, 0x898B, 0x5ED3, 0x5140, 0x55C0, 0x0, 0x0, 0x585A, 0x0, 0x6674, 0x0, 0x0,
    0x51DE, 0x732A, 0x76CA, 0x793C, 0x795E, 0x7965, 0x798F, 0x9756, 0x7CBE, 0x7FBD, 0x0, 0x8612,
    0x0, 0x8AF8, 0x0, 0x0, 0x9038, 0x90FD, 0x0, 0x0, 0x0, 0x98EF, 0x98FC, 0x9928, 0x9DB4, 0x90DE,
    0x96B7, 0x4FAE, 0x50E7, 0x514D, 0x52C9, 0x52E4, 0x5351, 0x559D, 0x5606, 0x5668, 0x5840, 0x58A8,
    0x5C64, 0x5C6E, 0x6094, 0x6168, 0x618E, 0x61F2, 0x654F, 0x65E2, 0x6691, 0x6885, 0x6D77, 0x6E1A,
    0x6F22, 0x716E, 0x722B, 0x7422, 0x7891, 0x793E, 0x7949, 0x7948, 0x7950, 0x7956, 0x795D, 0x798D,
    0x798E, 0x7A40, 0x7A81, 0x7BC0, 0x7DF4, 0x7E09, 0x7E41, 0x7F72, 0x8005, 0x81ED, 0x8279, 0x8279,
    0x8457, 0x8910, 0x8996, 0x8B01, 0x8B39, 0x8CD3, 0x8D08, 0x8FB6, 0x9038, 0x96E3, 0x97FF, 0x983B,
    0x6075, 0x242EE, 0x8218, 0x0, 0x0, 0x4E26, 0x51B5, 0x5168, 0x4F80, 0x5145, 0x5180, 0x52C7,
    0x52FA, 0x559D, 0x5555, 0x5599, 0x55E2, 0x585A, 0x58B3, 0x5944, 0x5954, 0x5A62, 0x5B28, 0x5ED2,
    0x5ED9, 0x5F69, 0x5FAD, 0x60D8, 0x614E, 0x6108, 0x618E, 0x6160, 0x61F2, 0x6234, 0x63C4, 0x641C,
    0x6452, 0x6556, 0x6674, 0x6717, 0x671B, 0x6756, 0x6B79, 0x6BBA, 0x6D41, 0x6EDB, 0x6ECB, 0x6F22,
    0x701E, 0x716E, 0x77A7, 0x7235, 0x72AF, 0x732A, 0x7471, 0x7506, 0x753B, 0x761D, 0x761F, 0x76CA,
    0x76DB, 0x76F4, 0x774A, 0x7740, 0x78CC, 0x7AB1, 0x7BC0, 0x7C7B, 0x7D5B, 0x7DF4, 0x7F3E, 0x8005,
    0x8352, 0x83EF, 0x8779, 0x8941, 0x8986, 0x8996, 0x8ABF, 0x8AF8, 0x8ACB, 0x8B01, 0x8AFE, 0x8AED,
    0x8B39, 0x8B8A, 0x8D08, 0x8F38, 0x9072, 0x9199, 0x9276, 0x967C, 0x96E3, 0x9756, 0x97DB, 0x97FF,
    0x980B, 0x983B, 0x9B12, 0x9F9C, 0x2284A, 0x22844, 0x233D5, 0x3B9D, 0x4018, 0x4039, 0x25249,
    0x25CD0, 0x27ED3, 0x9F43, 0x9F8E,
};
/* Canonical combining classes (first, last, class) for Latin, Greek, Cyrillic, Hebrew,
   combining-mark blocks, Hangul tone marks and kana voicing marks; others read as 0. */
static const uint16_t kmed__data_ccc[][3] = {
    {0x300,0x314,230}, {0x315,0x315,232}, {0x316,0x319,220}, {0x31A,0x31A,232}, {0x31B,0x31B,216},
    {0x31C,0x320,220}, {0x321,0x322,202}, {0x323,0x326,220}, {0x327,0x328,202}, {0x329,0x333,220},
    {0x334,0x338,1}, {0x339,0x33C,220}, {0x33D,0x344,230}, {0x345,0x345,240}, {0x346,0x346,230},
    {0x347,0x349,220}, {0x34A,0x34C,230}, {0x34D,0x34E,220}, {0x350,0x352,230}, {0x353,0x356,220},
    {0x357,0x357,230}, {0x358,0x358,232}, {0x359,0x35A,220}, {0x35B,0x35B,230}, {0x35C,0x35C,233},
    {0x35D,0x35E,234}, {0x35F,0x35F,233}, {0x360,0x361,234}, {0x362,0x362,233}, {0x363,0x36F,230},
    {0x483,0x487,230}, {0x591,0x591,220}, {0x592,0x595,230}, {0x596,0x596,220}, {0x597,0x599,230},
    {0x59A,0x59A,222}, {0x59B,0x59B,220}, {0x59C,0x5A1,230}, {0x5A2,0x5A7,220}, {0x5A8,0x5A9,230},
    {0x5AA,0x5AA,220}, {0x5AB,0x5AC,230}, {0x5AD,0x5AD,222}, {0x5AE,0x5AE,228}, {0x5AF,0x5AF,230},
    {0x5B0,0x5B0,10}, {0x5B1,0x5B1,11}, {0x5B2,0x5B2,12}, {0x5B3,0x5B3,13}, {0x5B4,0x5B4,14},
    {0x5B5,0x5B5,15}, {0x5B6,0x5B6,16}, {0x5B7,0x5B7,17}, {0x5B8,0x5B8,18}, {0x5B9,0x5BA,19},
    {0x5BB,0x5BB,20}, {0x5BC,0x5BC,21}, {0x5BD,0x5BD,22}, {0x5BF,0x5BF,23}, {0x5C1,0x5C1,24},
    {0x5C2,0x5C2,25}, {0x5C4,0x5C4,230}, {0x5C5,0x5C5,220}, {0x5C7,0x5C7,18}, {0x1AB0,0x1AB4,230},
    {0x1AB5,0x1ABA,220}, {0x1ABB,0x1ABC,230}, {0x1ABD,0x1ABD,220}, {0x1ABF,0x1AC0,220},
    {0x1AC1,0x1AC2,230}, {0x1AC3,0x1AC4,220}, {0x1AC5,0x1AC9,230}, {0x1ACA,0x1ACA,220},
    {0x1ACB,0x1ACE,230}, {0x1DC0,0x1DC1,230}, {0x1DC2,0x1DC2,220}, {0x1DC3,0x1DC9,230},
    {0x1DCA,0x1DCA,220}, {0x1DCB,0x1DCC,230}, {0x1DCD,0x1DCD,234}, {0x1DCE,0x1DCE,214},
    {0x1DCF,0x1DCF,220}, {0x1DD0,0x1DD0,202}, {0x1DD1,0x1DF5,230}, {0x1DF6,0x1DF6,232},
    {0x1DF7,0x1DF8,228}, {0x1DF9,0x1DF9,220}, {0x1DFA,0x1DFA,218}, {0x1DFB,0x1DFB,230},
    {0x1DFC,0x1DFC,233}, {0x1DFD,0x1DFD,220}, {0x1DFE,0x1DFE,230}, {0x1DFF,0x1DFF,220},
    {0x20D0,0x20D1,230}, {0x20D2,0x20D3,1}, {0x20D4,0x20D7,230}, {0x20D8,0x20DA,1},
    {0x20DB,0x20DC,230}, {0x20E1,0x20E1,230}, {0x20E5,0x20E6,1}, {0x20E7,0x20E7,230},
    {0x20E8,0x20E8,220}, {0x20E9,0x20E9,230}, {0x20EA,0x20EB,1}, {0x20EC,0x20EF,220},
    {0x20F0,0x20F0,230}, {0x302A,0x302A,218}, {0x302B,0x302B,228}, {0x302C,0x302C,232},
    {0x302D,0x302D,222}, {0x302E,0x302F,224}, {0x3099,0x309A,8}, {0xFE20,0xFE26,230},
    {0xFE27,0xFE2D,220}, {0xFE2E,0xFE2F,230},
};

/* ---- UTF-8 ---- */

/* Decodes one code point at s[*i] (i < n), advancing *i; invalid bytes give U+FFFD and
   advance by one, so every input makes progress. */
static uint32_t kmed__data_utf8_next(const unsigned char *s, size_t n, size_t *i)
{
    size_t k = *i;
    uint32_t c = s[k], cp;
    if (c < 0x80) { *i = k + 1; return c; }
    if (c >= 0xC2 && c <= 0xDF && k + 1 < n && (s[k + 1] & 0xC0) == 0x80) {
        *i = k + 2;
        return ((c & 0x1F) << 6) | (s[k + 1] & 0x3F);
    }
    if (c >= 0xE0 && c <= 0xEF && k + 2 < n && (s[k + 1] & 0xC0) == 0x80 &&
        (s[k + 2] & 0xC0) == 0x80) {
        cp = ((c & 0x0F) << 12) | ((uint32_t)(s[k + 1] & 0x3F) << 6) | (s[k + 2] & 0x3F);
        if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) { *i = k + 3; return cp; }
    }
    if (c >= 0xF0 && c <= 0xF4 && k + 3 < n && (s[k + 1] & 0xC0) == 0x80 &&
        (s[k + 2] & 0xC0) == 0x80 && (s[k + 3] & 0xC0) == 0x80) {
        cp = ((c & 0x07) << 18) | ((uint32_t)(s[k + 1] & 0x3F) << 12) |
             ((uint32_t)(s[k + 2] & 0x3F) << 6) | (s[k + 3] & 0x3F);
        if (cp >= 0x10000 && cp <= 0x10FFFF) { *i = k + 4; return cp; }
    }
    *i = k + 1;
    return 0xFFFD;
}

static void kmed__data_put_cp(kmed_buf *b, uint32_t c)
{
    char t[4];
    size_t n;
    if (c < 0x80) { t[0] = (char)c; n = 1; }
    else if (c < 0x800) { t[0] = (char)(0xC0 | (c >> 6)); t[1] = (char)(0x80 | (c & 0x3F)); n = 2; }
    else if (c < 0x10000) {
        t[0] = (char)(0xE0 | (c >> 12)); t[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        t[2] = (char)(0x80 | (c & 0x3F)); n = 3;
    } else {
        t[0] = (char)(0xF0 | (c >> 18)); t[1] = (char)(0x80 | ((c >> 12) & 0x3F));
        t[2] = (char)(0x80 | ((c >> 6) & 0x3F)); t[3] = (char)(0x80 | (c & 0x3F)); n = 4;
    }
    kmed_buf_put(b, t, n);
}

/* ---- NFC ---- */

#define KMED__DATA_SBASE 0xAC00u
#define KMED__DATA_LBASE 0x1100u
#define KMED__DATA_VBASE 0x1161u
#define KMED__DATA_TBASE 0x11A7u
#define KMED__DATA_LCOUNT 19u
#define KMED__DATA_VCOUNT 21u
#define KMED__DATA_TCOUNT 28u
#define KMED__DATA_NCOUNT (KMED__DATA_VCOUNT * KMED__DATA_TCOUNT)
#define KMED__DATA_SCOUNT (KMED__DATA_LCOUNT * KMED__DATA_NCOUNT)

static int kmed__data_ccc_of(uint32_t c)
{
    size_t lo = 0, hi = sizeof kmed__data_ccc / sizeof kmed__data_ccc[0];
    if (c < 0x300 || c > 0xFE2F) return 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < kmed__data_ccc[mid][0]) hi = mid;
        else if (c > kmed__data_ccc[mid][1]) lo = mid + 1;
        else return kmed__data_ccc[mid][2];
    }
    return 0;
}

/* Composite of (a, b) from the table, or 0. */
static uint32_t kmed__data_compose_pair(uint32_t a, uint32_t b)
{
    size_t lo = 0, hi = sizeof kmed__data_comp / sizeof kmed__data_comp[0];
    if (a > 0xFFFF || b > 0xFFFF) return 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        uint32_t ka = kmed__data_comp[mid][0], kb = kmed__data_comp[mid][1];
        if (a < ka || (a == ka && b < kb)) hi = mid;
        else if (a > ka || b > kb) lo = mid + 1;
        else return kmed__data_comp[mid][2];
    }
    return 0;
}

/* The (base, mark) a composite splits into, by a scan of the table (rare: only runs when
   a composite is followed by a combining mark). */
static int kmed__data_decompose_pair(uint32_t c, uint32_t *a, uint32_t *b)
{
    size_t i, n = sizeof kmed__data_comp / sizeof kmed__data_comp[0];
    for (i = 0; i < n; i++)
        if (kmed__data_comp[i][2] == c) {
            *a = kmed__data_comp[i][0];
            *b = kmed__data_comp[i][1];
            return 1;
        }
    return 0;
}

static uint32_t kmed__data_singleton(uint32_t c)
{
    size_t i, n = sizeof kmed__data_single / sizeof kmed__data_single[0];
    if (c >= 0xF900 && c <= 0xFAD9) {
        uint32_t m = kmed__data_cjk_compat[c - 0xF900];
        return m ? m : c;
    }
    if (c < 0x340 || c > 0x232A) return c;
    for (i = 0; i < n; i++)
        if (kmed__data_single[i][0] == c) return kmed__data_single[i][1];
    return c;
}

/* 1 if c may change under NFC in context: combining marks, medial/final jamo, singletons,
   and U+0344. Text without any such code point is already NFC (the fast path). */
static int kmed__data_nfc_special(uint32_t c)
{
    if (c < 0x300) return 0;
    if (c >= 0xAC00 && c < 0xF900) return 0;
    if (c >= 0x1161 && c <= 0x11C2) return 1;
    if (c >= 0xF900 && c <= 0xFAD9) return kmed__data_cjk_compat[c - 0xF900] != 0;
    if (kmed__data_ccc_of(c)) return 1;
    if (c == 0x344 || kmed__data_singleton(c) != c) return 1;
    /* second halves of compositions with class 0: kana voicing handled by ccc; Cyrillic,
       Greek and Latin marks are all in the ccc table */
    return 0;
}

/* Appends the full canonical decomposition of c (table composites only) to cps. */
static void kmed__data_decompose(uint32_t c, uint32_t *cps, size_t *n, size_t cap)
{
    uint32_t a, b;
    c = kmed__data_singleton(c);
    if (c == 0x344) {
        if (*n + 2 <= cap) { cps[(*n)++] = 0x308; cps[(*n)++] = 0x301; }
        return;
    }
    if (c >= 0xC0 && c < 0x3100 && kmed__data_decompose_pair(c, &a, &b)) {
        kmed__data_decompose(a, cps, n, cap);
        if (*n < cap) cps[(*n)++] = b;
        return;
    }
    if (*n < cap) cps[(*n)++] = c;
}

/* Normalises one segment cps[0..n) in place (canonical order, then composition); returns
   the new length. */
static size_t kmed__data_compose(uint32_t *cps, size_t n)
{
    size_t i, j, starter = 0, out;
    int last_ccc;
    if (n == 0) return 0;
    /* canonical ordering: stable insertion sort of each run of non-zero classes */
    for (i = 1; i < n; i++) {
        int ci = kmed__data_ccc_of(cps[i]);
        if (!ci) continue;
        j = i;
        while (j > 0) {
            int cj = kmed__data_ccc_of(cps[j - 1]);
            uint32_t t;
            if (!cj || cj <= ci) break;
            t = cps[j]; cps[j] = cps[j - 1]; cps[j - 1] = t;
            j--;
        }
    }
    /* composition with blocking (UAX #15): a mark composes with the last starter unless
       a mark of the same or higher class sits between them */
    out = 1;
    last_ccc = kmed__data_ccc_of(cps[0]) ? 256 : 0;
    starter = 0;
    if (last_ccc) starter = (size_t)-1;
    for (i = 1; i < n; i++) {
        uint32_t c = cps[i], comp = 0;
        int cc = kmed__data_ccc_of(c);
        if (starter != (size_t)-1) {
            uint32_t s = cps[starter];
            int blocked = out - 1 != starter && (last_ccc == 0 || last_ccc >= cc);
            if (!blocked) {
                if (s >= KMED__DATA_LBASE && s < KMED__DATA_LBASE + KMED__DATA_LCOUNT &&
                    c >= KMED__DATA_VBASE && c < KMED__DATA_VBASE + KMED__DATA_VCOUNT)
                    comp = KMED__DATA_SBASE + ((s - KMED__DATA_LBASE) * KMED__DATA_VCOUNT +
                                               (c - KMED__DATA_VBASE)) * KMED__DATA_TCOUNT;
                else if (s >= KMED__DATA_SBASE && s < KMED__DATA_SBASE + KMED__DATA_SCOUNT &&
                         (s - KMED__DATA_SBASE) % KMED__DATA_TCOUNT == 0 &&
                         c > KMED__DATA_TBASE && c < KMED__DATA_TBASE + KMED__DATA_TCOUNT)
                    comp = s + (c - KMED__DATA_TBASE);
                else
                    comp = kmed__data_compose_pair(s, c);
            }
        }
        if (comp) {
            cps[starter] = comp;
            continue;
        }
        if (cc == 0) { starter = out; last_ccc = 0; }
        else last_ccc = cc;
        cps[out++] = c;
    }
    return out;
}

/* Length of the run at u[i] of ASCII and precomposed Hangul syllables (U+AC00..U+D7FF,
   the bulk of Korean text), which no normalisation or clean-up step changes. */
static size_t kmed__data_plain_run(const unsigned char *u, size_t n, size_t i)
{
    size_t s = i;
    while (i < n) {
        unsigned c = u[i];
        if (c > 0x20 && c < 0x7F) { i++; continue; }
        if (c >= 0xEA && c <= 0xED && i + 2 < n && (u[i + 1] & 0xC0) == 0x80 &&
            (u[i + 2] & 0xC0) == 0x80 && (c != 0xED || u[i + 1] < 0xA0)) {
            i += 3;
            continue;
        }
        break;
    }
    return i - s;
}

/* Offset of the first code point that NFC might change (n if none). */
static size_t kmed__data_nfc_quick(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t at = i;
        uint32_t c;
        i += kmed__data_plain_run(u, n, i);
        if (i >= n) break;
        if (u[i] < 0x80) { i++; continue; }
        at = i;
        c = kmed__data_utf8_next(u, n, &i);
        if (c == 0xFFFD ? i - at != 3 : kmed__data_nfc_special(c)) return at;
    }
    return n;
}

KMED_API void kmed_data_nfc(kmed_buf *out, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = kmed__data_nfc_quick(s, n), run = 0, seg_cap = 0;
    uint32_t *seg = NULL;
    /* fast path: copy runs that need no change; only code points >= U+0300 can change */
    while (i < n) {
        size_t at = i, k, nseg;
        uint32_t c;
        if (u[i] < 0x80) { i++; continue; }
        c = kmed__data_utf8_next(u, n, &i);
        if (c != 0xFFFD && !kmed__data_nfc_special(c)) continue;
        if (c == 0xFFFD && i - at == 3) continue; /* a real U+FFFD stays */
        if (c == 0xFFFD) { /* an invalid byte: write the replacement character */
            kmed_buf_put(out, s + run, at - run);
            kmed__data_put_cp(out, 0xFFFD);
            run = i;
            continue;
        }
        /* back up to the last starter before `at` (a code point starting at an earlier
           byte whose class is 0 and which is not a medial/final jamo) */
        k = at;
        while (k > run) {
            size_t p = k - 1, q;
            uint32_t pc;
            while (p > run && (u[p] & 0xC0) == 0x80) p--;
            q = p;
            pc = kmed__data_utf8_next(u, n, &q);
            k = p;
            if (!kmed__data_ccc_of(pc) && !(pc >= 0x1161 && pc <= 0x11C2)) break;
        }
        /* the segment runs to the next code point that is a plain starter */
        {
            size_t e = i;
            while (e < n) {
                size_t q = e;
                uint32_t nc = kmed__data_utf8_next(u, n, &q);
                if (!kmed__data_nfc_special(nc) || nc == 0xFFFD) break;
                e = q;
            }
            /* decompose [k, e) into code points */
            if (seg_cap < (e - k) * 3 + 8) {
                uint32_t *ns;
                seg_cap = (e - k) * 3 + 8;
                ns = (uint32_t *)KMED_REALLOC(seg, seg_cap * sizeof *seg);
                if (!ns) { out->failed = 1; KMED_FREE(seg); return; }
                seg = ns;
            }
            nseg = 0;
            {
                size_t q = k;
                while (q < e) {
                    uint32_t dc = kmed__data_utf8_next(u, n, &q);
                    kmed__data_decompose(dc, seg, &nseg, seg_cap);
                }
            }
            nseg = kmed__data_compose(seg, nseg);
            kmed_buf_put(out, s + run, k - run);
            for (k = 0; k < nseg; k++) kmed__data_put_cp(out, seg[k]);
            run = i = e;
        }
    }
    kmed_buf_put(out, s + run, n - run);
    if (!out->data) kmed_buf_put(out, "", 0);
    KMED_FREE(seg);
}

/* ---- HTML and whitespace clean-up ---- */

static const struct { const char *name; uint16_t cp; } kmed__data_entities[] = {
    {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}, {"nbsp", 0xA0},
    {"middot", 0xB7}, {"hellip", 0x2026}, {"ndash", 0x2013}, {"mdash", 0x2014},
    {"lsquo", 0x2018}, {"rsquo", 0x2019}, {"ldquo", 0x201C}, {"rdquo", 0x201D},
    {"laquo", 0xAB}, {"raquo", 0xBB}, {"bull", 0x2022}, {"deg", 0xB0}, {"plusmn", 0xB1},
    {"times", 0xD7}, {"divide", 0xF7}, {"micro", 0xB5}, {"le", 0x2264}, {"ge", 0x2265},
    {"ne", 0x2260}, {"asymp", 0x2248}, {"larr", 0x2190}, {"rarr", 0x2192}, {"uarr", 0x2191},
    {"darr", 0x2193}, {"harr", 0x2194}, {"copy", 0xA9}, {"reg", 0xAE}, {"trade", 0x2122},
    {"sup1", 0xB9}, {"sup2", 0xB2}, {"sup3", 0xB3}, {"frac12", 0xBD}, {"frac14", 0xBC},
    {"frac34", 0xBE}, {"permil", 0x2030}, {"prime", 0x2032}, {"sect", 0xA7}, {"para", 0xB6},
    {"cent", 0xA2}, {"pound", 0xA3}, {"yen", 0xA5}, {"euro", 0x20AC}, {"shy", 0xAD},
    {"zwj", 0x200D}, {"zwnj", 0x200C}, {"thinsp", 0x2009}, {"ensp", 0x2002},
    {"emsp", 0x2003}, {"alpha", 0x3B1}, {"beta", 0x3B2}, {"gamma", 0x3B3},
    {"delta", 0x3B4}, {"epsilon", 0x3B5}, {"kappa", 0x3BA}, {"lambda", 0x3BB},
    {"mu", 0x3BC}, {"pi", 0x3C0}, {"sigma", 0x3C3}, {"tau", 0x3C4}, {"omega", 0x3C9},
    {"Delta", 0x394}, {"Sigma", 0x3A3}, {"Omega", 0x3A9}, {"infin", 0x221E},
    {"minus", 0x2212}, {"sum", 0x2211}, {"radic", 0x221A}, {"lceil", 0x2308},
    {"rceil", 0x2309}, {"lfloor", 0x230A}, {"rfloor", 0x230B}, {"iexcl", 0xA1},
    {"iquest", 0xBF}, {"eacute", 0xE9}, {"egrave", 0xE8}, {"uuml", 0xFC}, {"ouml", 0xF6},
    {"auml", 0xE4}, {"szlig", 0xDF}, {"ccedil", 0xE7}, {"ntilde", 0xF1}
};

/* Decodes the entity at s[i] == '&' into *cp and returns its length, or 0 if none. */
static size_t kmed__data_entity(const char *s, size_t n, size_t i, uint32_t *cp)
{
    size_t j = i + 1, k;
    if (j < n && s[j] == '#') {
        uint32_t v = 0;
        int hex = 0, digits = 0;
        j++;
        if (j < n && (s[j] == 'x' || s[j] == 'X')) { hex = 1; j++; }
        for (; j < n && digits < 8; j++, digits++) {
            char c = s[j];
            if (c >= '0' && c <= '9') v = v * (hex ? 16 : 10) + (uint32_t)(c - '0');
            else if (hex && c >= 'a' && c <= 'f') v = v * 16 + (uint32_t)(c - 'a' + 10);
            else if (hex && c >= 'A' && c <= 'F') v = v * 16 + (uint32_t)(c - 'A' + 10);
            else break;
        }
        if (!digits || j >= n || s[j] != ';') return 0;
        if (v == 0 || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) v = 0xFFFD;
        *cp = v;
        return j + 1 - i;
    }
    for (k = j; k < n && k - j < 10 && isalnum((unsigned char)s[k]); k++) {}
    if (k >= n || s[k] != ';' || k == j) return 0;
    {
        size_t e, m = k - j;
        for (e = 0; e < sizeof kmed__data_entities / sizeof kmed__data_entities[0]; e++)
            if (strlen(kmed__data_entities[e].name) == m &&
                memcmp(kmed__data_entities[e].name, s + j, m) == 0) {
                *cp = kmed__data_entities[e].cp;
                return k + 1 - i;
            }
    }
    return 0;
}

/* 1 if the tag name at s[j..] (after '<' and an optional '/') is one that breaks a line. */
static int kmed__data_block_tag(const char *s, size_t n, size_t j)
{
    static const char *const tags[] = {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4",
                                       "h5", "h6", "ul", "ol", "table", "dt", "dd", "hr"};
    size_t t, k = j;
    while (k < n && isalnum((unsigned char)s[k])) k++;
    for (t = 0; t < sizeof tags / sizeof tags[0]; t++) {
        size_t m = strlen(tags[t]), q;
        if (m != k - j) continue;
        for (q = 0; q < m && tolower((unsigned char)s[j + q]) == tags[t][q]; q++) {}
        if (q == m) return 1;
    }
    return 0;
}

/* Tags out (when strip), entities decoded. A '<' not followed by a letter, '/' or '!'
   is text ("혈압 < 140"). */
static void kmed__data_html(kmed_buf *out, const char *s, size_t n, int strip)
{
    size_t i = 0, run = 0;
    while (i < n) {
        char c = s[i];
        if (c == '&') {
            uint32_t cp;
            size_t m = kmed__data_entity(s, n, i, &cp);
            if (m) {
                kmed_buf_put(out, s + run, i - run);
                kmed__data_put_cp(out, cp);
                i += m;
                run = i;
                continue;
            }
        } else if (c == '<' && strip && i + 1 < n &&
                   (isalpha((unsigned char)s[i + 1]) || s[i + 1] == '/' || s[i + 1] == '!')) {
            size_t j = i + 1, e;
            int slash = s[j] == '/';
            const char *end = "";
            if (s[j] == '!' && j + 2 < n && s[j + 1] == '-' && s[j + 2] == '-') end = "-->";
            for (e = j; e < n; e++) {
                if (*end ? (e + 2 < n && memcmp(s + e, end, 3) == 0) : s[e] == '>') break;
                if (!*end && s[e] == '<') break; /* "<a <b>": the first was not a tag */
            }
            if (e < n && (*end || s[e] == '>')) {
                size_t close = e + (*end ? 3 : 1);
                kmed_buf_put(out, s + run, i - run);
                /* block tags break lines; adjacent ones ("</p><br>") give one break */
                if (kmed__data_block_tag(s, n, j + slash) &&
                    !(out->len && out->data[out->len - 1] == '\n'))
                    kmed_buf_put(out, "\n", 1);
                /* script and style bodies are not text */
                if (!slash && (kmed__data_block_tag(s, n, j) == 0) &&
                    ((n - j >= 6 && strncmp(s + j, "script", 6) == 0) ||
                     (n - j >= 5 && strncmp(s + j, "style", 5) == 0))) {
                    const char *tag = s[j + 1] == 'c' ? "</script>" : "</style>";
                    size_t tl = strlen(tag), q;
                    for (q = close; q + tl <= n && strncmp(s + q, tag, tl) != 0; q++) {}
                    close = q + tl <= n ? q + tl : n;
                }
                i = run = close;
                continue;
            }
        }
        i++;
    }
    kmed_buf_put(out, s + run, n - run);
}

/* Emits the whitespace pending before the next kept character: one blank line at most,
   nothing at the start of the text. */
static void kmed__data_ws_flush(kmed_buf *out, int any, int *pend_sp, int *pend_nl)
{
    if (any) {
        if (*pend_nl) kmed_buf_put(out, "\n\n", *pend_nl > 1 ? 2 : 1);
        else if (*pend_sp) kmed_buf_put(out, " ", 1);
    }
    *pend_sp = *pend_nl = 0;
}

/* Controls, U+FFFD, zero-width and soft hyphen go; Unicode spaces become ' '; "\r\n" and
   "\r" become '\n'; runs collapsed and lines trimmed. */
static void kmed__data_space(kmed_buf *out, const char *s, size_t n, int oneline)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    int pend_sp = 0, pend_nl = 0, any = 0;
    while (i < n) {
        size_t at = i, plain = kmed__data_plain_run(u, n, i);
        uint32_t c;
        int kind = 0; /* 0 keep, 1 space, 2 newline, 3 drop */
        if (plain) {
            kmed__data_ws_flush(out, any, &pend_sp, &pend_nl);
            kmed_buf_put(out, s + at, plain);
            any = 1;
            i += plain;
            continue;
        }
        if (u[i] < 0x80) {
            c = u[i++];
            if (c == ' ') kind = 1;
            else if (c == '\n') kind = 2;
            else if (c == '\r') { kind = 2; if (i < n && u[i] == '\n') i++; }
            else if (c == '\t' || c == '\v' || c == '\f') kind = 1;
            else kind = 3;
        } else {
            c = kmed__data_utf8_next(u, n, &i);
            if (c >= 0x80 && c < 0xA0) kind = 3;                        /* C1 controls */
            else if (c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x202F ||
                     c == 0x205F || c == 0x3000) kind = 1;
            else if (c == 0x2028 || c == 0x2029 || c == 0x85) kind = 2;
            else if (c == 0xFFFD || c == 0xAD || c == 0x200B || c == 0xFEFF || c == 0x2060 ||
                     c == 0x3164 || c == 0xFFA0) kind = 3;
        }
        if (kind == 3) continue;
        if (kind == 1) { pend_sp = 1; continue; }
        if (kind == 2) {
            if (oneline) pend_sp = 1;
            else pend_nl++;
            continue;
        }
        kmed__data_ws_flush(out, any, &pend_sp, &pend_nl);
        kmed_buf_put(out, s + at, i - at);
        any = 1;
    }
    if (!out->data) kmed_buf_put(out, "", 0);
}

KMED_API void kmed_data_clean_text(kmed_buf *out, const char *s, size_t n, int flags)
{
    kmed_buf a = {0}, b = {0};
    const char *p = s;
    size_t pn = n, i;
    int has_markup = 0;
    for (i = 0; i < n; i++)
        if (s[i] == '&' || s[i] == '<') { has_markup = 1; break; }
    if (has_markup) {
        kmed__data_html(&a, s, n, flags & KMED_DATA_CLEAN_HTML);
        if (a.failed) { out->failed = 1; kmed_buf_free(&a); return; }
        p = a.data; pn = a.len;
    }
    if (kmed__data_nfc_quick(p, pn) < pn) { /* most text is NFC already: no copy then */
        kmed_data_nfc(&b, p, pn);
        p = b.data;
        pn = b.len;
    }
    if (b.failed) out->failed = 1;
    else kmed__data_space(out, p, pn, flags & KMED_DATA_CLEAN_ONELINE);
    kmed_buf_free(&a);
    kmed_buf_free(&b);
}

static int kmed__data_is_hangul(uint32_t c)
{
    return (c >= 0xAC00 && c <= 0xD7A3) || (c >= 0x1100 && c <= 0x11FF) ||
           (c >= 0x3131 && c <= 0x318E) || (c >= 0xA960 && c <= 0xA97F) ||
           (c >= 0xD7B0 && c <= 0xD7FF);
}

/* Letters of the scripts that medical Korean mixes in (Latin, Greek, Cyrillic, Han, kana). */
static int kmed__data_is_letter(uint32_t c)
{
    if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
    return kmed__data_is_hangul(c) || (c >= 0xC0 && c <= 0x24F && c != 0xD7 && c != 0xF7) ||
           (c >= 0x370 && c <= 0x4FF) || (c >= 0x3040 && c <= 0x30FF) ||
           (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x1E00 && c <= 0x1FFF);
}

KMED_API double kmed_data_korean_share(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, letters = 0, hangul = 0;
    while (i < n) {
        uint32_t c = kmed__data_utf8_next(u, n, &i);
        if (!kmed__data_is_letter(c)) continue;
        letters++;
        hangul += (size_t)kmed__data_is_hangul(c);
    }
    return letters ? (double)hangul / (double)letters : 1.0;
}

/* ---- kinds, field maps, records ---- */

static const char *const kmed__data_kind_names[KMED_DATA_KIND_N] = {
    "kormedmcqa", "medexpqa", "ultramedical", "cod", "dict"};

KMED_API const char *kmed_data_kind_name(kmed_data_kind k)
{
    return (unsigned)k < KMED_DATA_KIND_N ? kmed__data_kind_names[k] : "?";
}

KMED_API kmed_result kmed_data_kind_parse(const char *s, kmed_data_kind *k, kmed_error *err)
{
    static const struct { const char *name; kmed_data_kind kind; } names[] = {
        {"kormedmcqa", KMED_DATA_MCQA}, {"mcqa", KMED_DATA_MCQA},
        {"medexpqa", KMED_DATA_EXPQA}, {"expqa", KMED_DATA_EXPQA},
        {"ultramedical", KMED_DATA_CONV}, {"conv", KMED_DATA_CONV},
        {"chat", KMED_DATA_CONV}, {"conversations", KMED_DATA_CONV},
        {"cod", KMED_DATA_COD}, {"case", KMED_DATA_COD},
        {"dict", KMED_DATA_DICT}, {"dictionary", KMED_DATA_DICT}, {"asan", KMED_DATA_DICT}};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i].name) == 0) { *k = names[i].kind; return KMED_OK; }
    return KMED__ERR(err, KMED_ERR_ARG, "unknown source kind '%s' (expected kormedmcqa, "
                     "medexpqa, ultramedical, cod or dict)", s);
}

/* Canonical field names per kind and the input keys tried for each, '|'-separated. */
typedef struct kmed__data_field { const char *dst, *aliases; } kmed__data_field;

static const kmed__data_field kmed__data_fields_mcqa[] = {
    {"id", "id|uid|qid"}, {"subject", "subject"}, {"year", "year"}, {"period", "period"},
    {"q_number", "q_number|question_number|number"}, {"question", "question|full_question"},
    {"A", "A|a"}, {"B", "B|b"}, {"C", "C|c"}, {"D", "D|d"}, {"E", "E|e"},
    {"answer", "answer|label|answer_idx"}, {"cot", "cot|explanation|rationale"},
    {"subset", "subset|category|exam"}, {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_expqa[] = {
    {"id", "id|qid|uid"}, {"question", "question|full_question|input|query"},
    {"options", "options|choices|answers"},
    {"answer", "correct_option|answer_idx|correct_answer|answer|cop|label"},
    {"explanation", "explanation|full_answer|exp|rationale|explanations"},
    {"lang", "lang|language"}, {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_conv[] = {
    {"id", "id|uid|conversation_id"},
    {"messages", "messages|conversations|conversation|dialogue|turns"},
    {"role", "role|from|speaker"}, {"content", "content|value|text|utterance"},
    {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_cod[] = {
    {"id", "id|case_id|uid"},
    {"case", "case|patient|patient_description|description|presentation|history|question|input"},
    {"symptoms", "symptoms|symptom|chief_complaint|findings"},
    {"diagnosis", "diagnosis|disease|final_diagnosis|answer|output|label"},
    {"explanation", "explanation|reasoning|rationale"},
    {"dialogue", "dialogue|dialog|conversations|messages|turns"},
    {"role", "role|from|speaker"}, {"content", "content|value|text|utterance"},
    {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_dict[] = {
    {"id", "id|uid|url"}, {"name", "name|title|disease|disease_name|병명|질환명|질병명"},
    {"sections", "sections|contents|content|body"},
    {"section_title", "title|name|section|heading|key"},
    {"section_text", "content|text|body|value"}, {"split", "split"}, {NULL, NULL}};

static const kmed__data_field *kmed__data_fields(kmed_data_kind k)
{
    switch (k) {
    case KMED_DATA_MCQA: return kmed__data_fields_mcqa;
    case KMED_DATA_EXPQA: return kmed__data_fields_expqa;
    case KMED_DATA_CONV: return kmed__data_fields_conv;
    case KMED_DATA_COD: return kmed__data_fields_cod;
    default: return kmed__data_fields_dict;
    }
}

KMED_API kmed_result kmed_data_source_map(kmed_data_source *src, const char *dst_eq_src,
                                          kmed_error *err)
{
    const char *eq = strchr(dst_eq_src, '=');
    const kmed__data_field *f = kmed__data_fields(src->kind);
    size_t dl, sl, i;
    kmed_buf names = {0};
    if (!eq || eq == dst_eq_src || !eq[1])
        return KMED__ERR(err, KMED_ERR_ARG, "--map '%s': expected dst=src", dst_eq_src);
    dl = (size_t)(eq - dst_eq_src);
    sl = strlen(eq + 1);
    for (i = 0; f[i].dst; i++)
        if (strlen(f[i].dst) == dl && memcmp(f[i].dst, dst_eq_src, dl) == 0) break;
    if (!f[i].dst) {
        kmed_result r;
        for (i = 0; f[i].dst; i++) kmed_buf_printf(&names, "%s%s", i ? ", " : "", f[i].dst);
        r = KMED__ERR(err, KMED_ERR_ARG, "--map '%s': no field '%.*s' in %s (fields: %s)",
                      dst_eq_src, (int)dl, dst_eq_src, kmed_data_kind_name(src->kind),
                      names.data ? names.data : "");
        kmed_buf_free(&names);
        return r;
    }
    if (dl >= sizeof src->map[0].dst || sl >= sizeof src->map[0].src)
        return KMED__ERR(err, KMED_ERR_LIMIT, "--map '%s': name too long", dst_eq_src);
    for (i = 0; i < src->n_map; i++)
        if (strlen(src->map[i].dst) == dl && memcmp(src->map[i].dst, dst_eq_src, dl) == 0) break;
    if (i == src->n_map) {
        if (src->n_map >= KMED_DATA_MAX_MAP)
            return KMED__ERR(err, KMED_ERR_LIMIT, "more than %d --map overrides",
                             KMED_DATA_MAX_MAP);
        src->n_map++;
    }
    memcpy(src->map[i].dst, dst_eq_src, dl);
    src->map[i].dst[dl] = 0;
    memcpy(src->map[i].src, eq + 1, sl + 1);
    return KMED_OK;
}

/* Member at a dotted path ("a.b") of obj. */
static const kmed_json *kmed__data_path(const kmed_json *obj, const char *path, size_t n)
{
    char key[128];
    const char *dot = (const char *)memchr(path, '.', n);
    size_t kl = dot ? (size_t)(dot - path) : n;
    const kmed_json *v;
    if (kl >= sizeof key) return NULL;
    memcpy(key, path, kl);
    key[kl] = 0;
    v = kmed_json_get(obj, key);
    if (v && dot) return kmed__data_path(v, dot + 1, n - kl - 1);
    return v;
}

/* The input value for canonical field dst: the override if one is set, else the first
   preset alias present (and not null). */
static const kmed_json *kmed__data_get(const kmed_json *obj, const kmed_data_source *src,
                                       const char *dst)
{
    const kmed__data_field *f = kmed__data_fields(src->kind);
    const char *a;
    size_t i;
    for (i = 0; i < src->n_map; i++)
        if (strcmp(src->map[i].dst, dst) == 0)
            return kmed__data_path(obj, src->map[i].src, strlen(src->map[i].src));
    for (i = 0; f[i].dst && strcmp(f[i].dst, dst) != 0; i++) {}
    if (!f[i].dst) return NULL;
    for (a = f[i].aliases; *a;) {
        const char *bar = strchr(a, '|');
        size_t al = bar ? (size_t)(bar - a) : strlen(a);
        const kmed_json *v = kmed__data_path(obj, a, al);
        if (v && v->type != KMED_JSON_NULL) return v;
        a += al + (bar ? 1 : 0);
    }
    return NULL;
}

/* Appends the text of a value: strings as they are, numbers by their source text, arrays
   and objects as their members' text, one per line. Returns 1 if anything was added. */
static int kmed__data_text_of(const kmed_json *j, kmed_buf *b)
{
    size_t i, before = b->len;
    if (!j) return 0;
    switch (j->type) {
    case KMED_JSON_STRING: kmed_buf_put(b, j->str, j->len); break;
    case KMED_JSON_NUMBER: kmed_buf_put(b, j->str, j->len); break;
    case KMED_JSON_TRUE: kmed_buf_puts(b, "true"); break;
    case KMED_JSON_FALSE: kmed_buf_puts(b, "false"); break;
    case KMED_JSON_ARRAY:
    case KMED_JSON_OBJECT:
        for (i = 0; i < j->len; i++) {
            size_t at = b->len;
            if (at > before) kmed_buf_put(b, "\n", 1);
            if (!kmed__data_text_of(&j->kids[i], b) && b->len == at + 1) {
                b->len = at;
                if (b->data) b->data[at] = 0;
            }
        }
        break;
    default: break;
    }
    return b->len > before;
}

/* A string that holds JSON (a CSV cell with a list or object) parsed into tmp. */
static const kmed_json *kmed__data_structured(const kmed_json *j, kmed_json_doc *tmp)
{
    size_t i = 0;
    if (!j || j->type != KMED_JSON_STRING) return j;
    while (i < j->len && isspace((unsigned char)j->str[i])) i++;
    if (i == j->len || (j->str[i] != '[' && j->str[i] != '{')) return j;
    kmed_json_free(tmp);
    if (kmed_json_parse(tmp, j->str, j->len, NULL, 0, NULL) != KMED_OK) return j;
    return tmp->root;
}

static char *kmed__data_strdup(const char *s)
{
    return s ? kmed__strndup(s, strlen(s)) : NULL;
}

/* *out = new string with the text of field dst (NULL when absent or empty). */
static kmed_result kmed__data_field_str(const kmed_json *obj, const kmed_data_source *src,
                                        const char *dst, char **out)
{
    kmed_buf b = {0};
    *out = NULL;
    if (!kmed__data_text_of(kmed__data_get(obj, src, dst), &b)) {
        kmed_buf_free(&b);
        return KMED_OK;
    }
    if (b.failed) { kmed_buf_free(&b); return KMED_ERR_NOMEM; }
    *out = b.data;
    return KMED_OK;
}

/* Integer field: a JSON integer or a string holding one; 0 when absent or not integral. */
static int kmed__data_field_int(const kmed_json *j, int *ok)
{
    int64_t v;
    *ok = 0;
    if (!j) return 0;
    if (kmed_json_int(j, &v) && v > -1000000000 && v < 1000000000) { *ok = 1; return (int)v; }
    if (j->type == KMED_JSON_NUMBER && j->num == floor(j->num) && fabs(j->num) < 1e9) {
        *ok = 1;
        return (int)j->num;
    }
    if (j->type == KMED_JSON_STRING) {
        char *end;
        long l;
        const char *s = j->str;
        while (isspace((unsigned char)*s)) s++;
        l = strtol(s, &end, 10);
        while (isspace((unsigned char)*end)) end++;
        if (end != s && !*end && l > -1000000000 && l < 1000000000) { *ok = 1; return (int)l; }
    }
    return 0;
}

KMED_API void kmed_data_record_free(kmed_data_record *rec)
{
    size_t i;
    int k;
    KMED_FREE(rec->id); KMED_FREE(rec->source); KMED_FREE(rec->file);
    KMED_FREE(rec->subset); KMED_FREE(rec->split); KMED_FREE(rec->subject);
    KMED_FREE(rec->lang); KMED_FREE(rec->title); KMED_FREE(rec->question);
    KMED_FREE(rec->symptoms); KMED_FREE(rec->answer_text); KMED_FREE(rec->explanation);
    for (k = 0; k < rec->n_options && k < KMED_DATA_MAX_OPTIONS; k++) KMED_FREE(rec->options[k]);
    for (i = 0; i < rec->n_turns; i++) {
        KMED_FREE(rec->turns[i].key);
        KMED_FREE(rec->turns[i].text);
    }
    for (i = 0; i < rec->n_sections; i++) {
        KMED_FREE(rec->sections[i].key);
        KMED_FREE(rec->sections[i].text);
    }
    KMED_FREE(rec->turns);
    KMED_FREE(rec->sections);
    memset(rec, 0, sizeof *rec);
}

/* Appends (key, text) to a pair list, taking ownership of both (freed on failure). */
static int kmed__data_pair_push(kmed_data_pair **v, size_t *n, char *key, char *text)
{
    kmed_data_pair *nv;
    if (!key || !text) { KMED_FREE(key); KMED_FREE(text); return 0; }
    nv = (kmed_data_pair *)KMED_REALLOC(*v, (*n + 1) * sizeof **v);
    if (!nv) { KMED_FREE(key); KMED_FREE(text); return 0; }
    *v = nv;
    nv[*n].key = key;
    nv[*n].text = text;
    (*n)++;
    return 1;
}

/* "user", "assistant", "system", or NULL for an unknown role. */
static const char *kmed__data_role(const char *r)
{
    static const char *const user[] = {"user", "human", "patient", "client", "prompter",
                                       "question", "환자", "사용자", "USER", "Human", "User"};
    static const char *const bot[] = {"assistant", "gpt", "model", "bot", "doctor", "chatgpt",
                                      "answer", "의사", "ASSISTANT", "Assistant", "GPT",
                                      "Doctor"};
    size_t i;
    if (!r) return NULL;
    for (i = 0; i < sizeof user / sizeof user[0]; i++) if (strcmp(r, user[i]) == 0) return "user";
    for (i = 0; i < sizeof bot / sizeof bot[0]; i++) if (strcmp(r, bot[i]) == 0) return "assistant";
    if (strcmp(r, "system") == 0 || strcmp(r, "System") == 0) return "system";
    return NULL;
}

/* Reads a list of turns into rec->turns as alternating user/assistant, starting with user
   and ending with assistant: system text goes in front of the first user turn, repeated
   roles are merged, leading assistant and trailing user turns are left out. */
static kmed_result kmed__data_turns(kmed_data_record *rec, const kmed_json *list,
                                    const kmed_data_source *src, const char *file, size_t line,
                                    kmed_error *err)
{
    kmed_buf sys = {0};
    size_t i;
    int want_user = 1;
    if (!list || list->type != KMED_JSON_ARRAY)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "expected a list of turns");
    for (i = 0; i < list->len; i++) {
        const kmed_json *t = &list->kids[i];
        const char *role;
        kmed_buf text = {0};
        if (t->type == KMED_JSON_STRING) {
            role = (i % 2) ? "assistant" : "user";
            kmed__data_text_of(t, &text);
        } else if (t->type == KMED_JSON_OBJECT) {
            const kmed_json *rj = kmed__data_get(t, src, "role");
            role = kmed__data_role(kmed_json_str(rj, NULL));
            if (!role) {
                kmed_buf_free(&sys);
                return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                                      "turn %zu: unknown role '%s'", i + 1,
                                      kmed_json_str(rj, "(missing)"));
            }
            kmed__data_text_of(kmed__data_get(t, src, "content"), &text);
        } else {
            kmed_buf_free(&sys);
            return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                                  "turn %zu: expected an object or a string", i + 1);
        }
        if (!text.len) { kmed_buf_free(&text); continue; }
        if (strcmp(role, "system") == 0) {
            if (sys.len) kmed_buf_put(&sys, "\n\n", 2);
            kmed_buf_put(&sys, text.data, text.len);
            kmed_buf_free(&text);
            continue;
        }
        if (rec->n_turns == 0 && strcmp(role, "assistant") == 0) { kmed_buf_free(&text); continue; }
        if (strcmp(role, want_user ? "assistant" : "user") == 0) {
            /* same role as the previous turn: merge */
            kmed_data_pair *p = &rec->turns[rec->n_turns - 1];
            kmed_buf m = {0};
            kmed_buf_puts(&m, p->text);
            kmed_buf_put(&m, "\n\n", 2);
            kmed_buf_put(&m, text.data, text.len);
            kmed_buf_free(&text);
            if (m.failed) { kmed_buf_free(&m); kmed_buf_free(&sys); return KMED_ERR_NOMEM; }
            KMED_FREE(p->text);
            p->text = m.data;
            continue;
        }
        if (want_user && sys.len) {
            kmed_buf m = {0};
            kmed_buf_put(&m, sys.data, sys.len);
            kmed_buf_put(&m, "\n\n", 2);
            kmed_buf_put(&m, text.data, text.len);
            kmed_buf_free(&text);
            text = m;
            kmed_buf_free(&sys);
        }
        if (text.failed || !kmed__data_pair_push(&rec->turns, &rec->n_turns,
                                                 kmed__data_strdup(role), text.data)) {
            kmed_buf_free(&sys);
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        }
        want_user = !want_user;
    }
    kmed_buf_free(&sys);
    if (rec->n_turns % 2) { /* trailing user turn without a reply */
        rec->n_turns--;
        KMED_FREE(rec->turns[rec->n_turns].key);
        KMED_FREE(rec->turns[rec->n_turns].text);
    }
    if (rec->n_turns < 2)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "no user turn followed by an assistant turn");
    return KMED_OK;
}

/* Option index (1-based) named by an answer value, given the option keys. */
static int kmed__data_answer(const kmed_json *a, char keys[][16], int n)
{
    int ok, v, i;
    const char *s;
    if (!a) return 0;
    v = kmed__data_field_int(a, &ok);
    if (ok) {
        char t[16];
        snprintf(t, sizeof t, "%d", v);
        for (i = 0; i < n; i++) if (strcmp(keys[i], t) == 0) return i + 1;
        return v >= 1 && v <= n ? v : 0;
    }
    s = kmed_json_str(a, NULL);
    if (!s) return 0;
    while (isspace((unsigned char)*s)) s++;
    for (i = 0; i < n; i++) if (keys[i][0] && strcmp(keys[i], s) == 0) return i + 1;
    if (((*s >= 'A' && *s <= 'J') || (*s >= 'a' && *s <= 'j')) &&
        (!s[1] || s[1] == '.' || s[1] == ')' || isspace((unsigned char)s[1]))) {
        v = (*s | 0x20) - 'a' + 1;
        return v <= n ? v : 0;
    }
    return 0;
}

/* Known section names of an Asan-style entry kept in top-level columns. */
static int kmed__data_section_key(const char *k)
{
    static const char *const en[] = {"definition", "cause", "causes", "symptom", "symptoms",
                                     "diagnosis", "treatment", "course", "prognosis",
                                     "prevention", "complications", "overview"};
    const unsigned char *u = (const unsigned char *)k;
    size_t i = 0, n = strlen(k);
    for (i = 0; i < sizeof en / sizeof en[0]; i++) if (strcmp(k, en[i]) == 0) return 1;
    i = 0;
    while (i < n) if (kmed__data_is_hangul(kmed__data_utf8_next(u, n, &i))) return 1;
    return 0;
}

static kmed_result kmed__data_sections(kmed_data_record *rec, const kmed_json *obj,
                                       const kmed_data_source *src, const char *file,
                                       size_t line, kmed_error *err)
{
    kmed_json_doc tmp = {0};
    const kmed_json *secs = kmed__data_structured(kmed__data_get(obj, src, "sections"), &tmp);
    const kmed_json *name_field = kmed__data_get(obj, src, "name");
    size_t i;
    int oom = 0;
    if (secs && secs->type == KMED_JSON_OBJECT) {
        for (i = 0; i < secs->len && !oom; i++) {
            kmed_buf t = {0};
            if (!kmed__data_text_of(&secs->kids[i], &t)) { kmed_buf_free(&t); continue; }
            oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections,
                                        kmed__data_strdup(secs->kids[i].key), t.data);
        }
    } else if (secs && secs->type == KMED_JSON_ARRAY) {
        for (i = 0; i < secs->len && !oom; i++) {
            const kmed_json *s = &secs->kids[i];
            kmed_buf k = {0}, t = {0};
            if (s->type == KMED_JSON_OBJECT) {
                kmed__data_text_of(kmed__data_get(s, src, "section_title"), &k);
                kmed__data_text_of(kmed__data_get(s, src, "section_text"), &t);
            } else {
                kmed__data_text_of(s, &t);
            }
            if (!t.len) { kmed_buf_free(&k); kmed_buf_free(&t); continue; }
            if (!k.len) kmed_buf_put(&k, "", 0);
            oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections, k.data, t.data);
        }
    } else if (secs && secs->type == KMED_JSON_STRING) {
        kmed_buf t = {0};
        kmed__data_text_of(secs, &t);
        oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections, kmed__data_strdup(""),
                                    t.data);
    } else if (!secs && obj->type == KMED_JSON_OBJECT) {
        for (i = 0; i < obj->len && !oom; i++) {
            const kmed_json *v = &obj->kids[i];
            kmed_buf t = {0};
            if (v == name_field || !v->key || !kmed__data_section_key(v->key)) continue;
            if (v->type != KMED_JSON_STRING && v->type != KMED_JSON_ARRAY) continue;
            if (!kmed__data_text_of(v, &t)) { kmed_buf_free(&t); continue; }
            oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections,
                                        kmed__data_strdup(v->key), t.data);
        }
    }
    kmed_json_free(&tmp);
    if (oom) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    if (!rec->n_sections)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "dictionary entry without sections");
    return KMED_OK;
}

/* subset / split from a file name: "doctor", "nurse", "pharm", "dentist";
   "train", "dev"/"valid", "test", "fewshot". */
static void kmed__data_guess(const char *file, char *subset, char *split)
{
    static const char *const subsets[] = {"doctor", "nurse", "pharm", "dentist"};
    size_t i;
    subset[0] = split[0] = 0;
    for (i = 0; i < 4; i++) if (strstr(file, subsets[i])) { strcpy(subset, subsets[i]); break; }
    if (strstr(file, "fewshot")) strcpy(split, "fewshot");
    else if (strstr(file, "train")) strcpy(split, "train");
    else if (strstr(file, "dev") || strstr(file, "valid")) strcpy(split, "dev");
    else if (strstr(file, "test")) strcpy(split, "test");
}

/* Source name: src->name, else the file name without directory and extension. */
static void kmed__data_source_name(const kmed_data_source *src, char *out, size_t cap)
{
    const char *b = strrchr(src->path, '/'), *dot;
    size_t n;
    if (src->name[0]) { snprintf(out, cap, "%s", src->name); return; }
    b = b ? b + 1 : src->path;
    dot = strrchr(b, '.');
    n = dot && dot != b ? (size_t)(dot - b) : strlen(b);
    if (n >= cap) n = cap - 1;
    memcpy(out, b, n);
    out[n] = 0;
}

static const char *kmed__data_basename(const char *path)
{
    const char *b = strrchr(path, '/');
    return b ? b + 1 : path;
}

KMED_API kmed_result kmed_data_from_json(kmed_data_record *rec, const kmed_json *obj,
                                         const kmed_data_source *src, const char *file,
                                         size_t line, kmed_error *err)
{
    char name[64], gsub[16], gsplit[16];
    kmed_buf id = {0};
    kmed_result r = KMED_OK;
    kmed_json_doc tmp = {0};
    int ok;
    kmed_data_record_free(rec);
    if (!obj || obj->type != KMED_JSON_OBJECT)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "expected a JSON object");
    rec->kind = src->kind;
    kmed__data_source_name(src, name, sizeof name);
    rec->source = kmed__data_strdup(name);
    rec->file = kmed__data_strdup(file ? kmed__data_basename(file) : "");
    rec->line = line;
    kmed_buf_printf(&id, "%s:", name);
    if (!kmed__data_text_of(kmed__data_get(obj, src, "id"), &id) || id.len == strlen(name) + 1)
        kmed_buf_printf(&id, "%s:%zu", rec->file ? rec->file : "", line);
    rec->id = id.data;
    if (!rec->source || !rec->file || !rec->id) { r = KMED_ERR_NOMEM; goto fail; }
    if ((r = kmed__data_field_str(obj, src, "split", &rec->split))) goto fail;
    kmed__data_guess(rec->file, gsub, gsplit);
    if (src->split[0]) {
        KMED_FREE(rec->split);
        if (!(rec->split = kmed__data_strdup(src->split))) { r = KMED_ERR_NOMEM; goto fail; }
    } else if (!rec->split && gsplit[0]) {
        if (!(rec->split = kmed__data_strdup(gsplit))) { r = KMED_ERR_NOMEM; goto fail; }
    }

#define KMED__DATA_MISSING(what)                                                          \
    do {                                                                                  \
        r = kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1, "%s", what);     \
        goto fail;                                                                        \
    } while (0)

    switch (src->kind) {
    case KMED_DATA_MCQA: {
        static const char *const letters[] = {"A", "B", "C", "D", "E"};
        char keys[KMED_DATA_MAX_OPTIONS][16];
        int k;
        const kmed_json *ans;
        if ((r = kmed__data_field_str(obj, src, "question", &rec->question))) goto fail;
        if (!rec->question) KMED__DATA_MISSING("missing field 'question'");
        for (k = 0; k < 5; k++) {
            char *o;
            if ((r = kmed__data_field_str(obj, src, letters[k], &o))) goto fail;
            if (!o) break;
            rec->options[rec->n_options] = o;
            snprintf(keys[rec->n_options], 16, "%s", letters[k]);
            rec->n_options++;
        }
        if (rec->n_options < 2) KMED__DATA_MISSING("missing options 'A' and 'B'");
        ans = kmed__data_get(obj, src, "answer");
        if (!ans) KMED__DATA_MISSING("missing field 'answer'");
        rec->answer = kmed__data_answer(ans, keys, rec->n_options);
        if (!rec->answer) {
            kmed_buf t = {0};
            kmed__data_text_of(ans, &t);
            r = kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                               "field 'answer': '%.40s' is not an option number 1-%d",
                               t.data ? t.data : "", rec->n_options);
            kmed_buf_free(&t);
            goto fail;
        }
        if ((r = kmed__data_field_str(obj, src, "cot", &rec->explanation))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "subject", &rec->subject))) goto fail;
        rec->year = kmed__data_field_int(kmed__data_get(obj, src, "year"), &ok);
        rec->period = kmed__data_field_int(kmed__data_get(obj, src, "period"), &ok);
        rec->q_number = kmed__data_field_int(kmed__data_get(obj, src, "q_number"), &ok);
        if (src->subset[0]) rec->subset = kmed__data_strdup(src->subset);
        else if ((r = kmed__data_field_str(obj, src, "subset", &rec->subset))) goto fail;
        else if (!rec->subset && gsub[0]) rec->subset = kmed__data_strdup(gsub);
        break;
    }
    case KMED_DATA_EXPQA: {
        char keys[KMED_DATA_MAX_OPTIONS][16];
        const kmed_json *opts, *ans;
        size_t k;
        if ((r = kmed__data_field_str(obj, src, "question", &rec->question))) goto fail;
        if (!rec->question) KMED__DATA_MISSING("missing field 'question'");
        opts = kmed__data_structured(kmed__data_get(obj, src, "options"), &tmp);
        if (!opts || (opts->type != KMED_JSON_OBJECT && opts->type != KMED_JSON_ARRAY))
            KMED__DATA_MISSING("field 'options': expected an object or a list");
        for (k = 0; k < opts->len && rec->n_options < KMED_DATA_MAX_OPTIONS; k++) {
            kmed_buf t = {0};
            if (!kmed__data_text_of(&opts->kids[k], &t)) { kmed_buf_free(&t); continue; }
            if (t.failed) { kmed_buf_free(&t); r = KMED_ERR_NOMEM; goto fail; }
            snprintf(keys[rec->n_options], 16, "%s", opts->kids[k].key ? opts->kids[k].key : "");
            rec->options[rec->n_options++] = t.data;
        }
        if (rec->n_options < 2) KMED__DATA_MISSING("field 'options': fewer than 2 options");
        ans = kmed__data_get(obj, src, "answer");
        if (!ans) KMED__DATA_MISSING("missing field 'answer' (correct option)");
        rec->answer = kmed__data_answer(ans, keys, rec->n_options);
        if (!rec->answer)
            KMED__DATA_MISSING("field 'answer': not one of the options");
        if ((r = kmed__data_field_str(obj, src, "explanation", &rec->explanation))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "lang", &rec->lang))) goto fail;
        break;
    }
    case KMED_DATA_CONV: {
        const kmed_json *msgs = kmed__data_structured(kmed__data_get(obj, src, "messages"), &tmp);
        if (!msgs) KMED__DATA_MISSING("missing field 'messages' (or 'conversations')");
        if ((r = kmed__data_turns(rec, msgs, src, file, line, err))) goto fail_set;
        break;
    }
    case KMED_DATA_COD: {
        const kmed_json *dlg = kmed__data_structured(kmed__data_get(obj, src, "dialogue"), &tmp);
        if ((r = kmed__data_field_str(obj, src, "case", &rec->question))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "symptoms", &rec->symptoms))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "diagnosis", &rec->answer_text))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "explanation", &rec->explanation))) goto fail;
        if (dlg && dlg->type == KMED_JSON_ARRAY) {
            if ((r = kmed__data_turns(rec, dlg, src, file, line, err))) goto fail_set;
        } else {
            if (!rec->question && !rec->symptoms)
                KMED__DATA_MISSING("missing field 'case' (patient description) or 'symptoms'");
            if (!rec->answer_text) KMED__DATA_MISSING("missing field 'diagnosis'");
        }
        break;
    }
    case KMED_DATA_DICT:
    default:
        if ((r = kmed__data_field_str(obj, src, "name", &rec->title))) goto fail;
        if (!rec->title) KMED__DATA_MISSING("missing field 'name' (disease name)");
        if ((r = kmed__data_sections(rec, obj, src, file, line, err))) goto fail_set;
        break;
    }
#undef KMED__DATA_MISSING
    kmed_json_free(&tmp);
    return KMED_OK;
fail:
    if (r == KMED_ERR_NOMEM) KMED__ERR(err, r, "out of memory");
fail_set:
    kmed_json_free(&tmp);
    kmed_data_record_free(rec);
    return r;
}

/* ---- readers ---- */

KMED_API kmed_result kmed_data_open(kmed_data_reader *r, const kmed_data_source *src,
                                    kmed_error *err)
{
    const char *base = kmed__data_basename(src->path);
    const char *ext = strrchr(base, '.');
    kmed_result res;
    memset(r, 0, sizeof *r);
    r->src = src;
    {
        size_t bl = strlen(base);
        if (bl >= sizeof r->file) bl = sizeof r->file - 1;
        memcpy(r->file, base, bl);
        r->file[bl] = 0;
    }
    kmed__data_guess(base, r->subset, r->split);
    if (ext && (strcmp(ext, ".csv") == 0 || strcmp(ext, ".CSV") == 0)) {
        r->fmt_ = 2;
        if ((res = kmed_csv_open(&r->csv_, src->path, err))) return res;
        r->row_kids_ = (kmed_json *)kmed__calloc(r->csv_.n_cols ? r->csv_.n_cols : 1,
                                                 sizeof *r->row_kids_);
        if (!r->row_kids_) {
            kmed_csv_close(&r->csv_);
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        }
        return KMED_OK;
    }
    if (ext && strcmp(ext, ".json") == 0) {
        char *data;
        size_t len, i = 0;
        if ((res = kmed_file_read(src->path, 0, &data, &len, err))) return res;
        while (i < len && isspace((unsigned char)data[i])) i++;
        if (i < len && data[i] == '[') {
            r->fmt_ = 1;
            res = kmed_json_parse(&r->doc_, data, len, src->path, 0, &r->err_);
            kmed_free(data);
            if (res == KMED_OK) r->arr_ = r->doc_.root;
            return KMED_OK; /* a parse error is reported by the first kmed_data_next */
        }
        if (i < len && data[i] == '{') {
            /* one object holding the records in an array member ("data", "rows", ...),
               else one record per line */
            res = kmed_json_parse(&r->doc_, data, len, src->path, 0, NULL);
            if (res == KMED_OK) {
                size_t k;
                const kmed_json *root = r->doc_.root;
                for (k = 0; k < root->len; k++)
                    if (root->kids[k].type == KMED_JSON_ARRAY) break;
                if (k < root->len) {
                    kmed_free(data);
                    r->fmt_ = 1;
                    r->arr_ = &root->kids[k];
                    return KMED_OK;
                }
            }
            kmed_json_free(&r->doc_);
        }
        kmed_free(data);
    }
    r->fmt_ = 0;
    return kmed_jsonl_open(&r->jsonl_, src->path, err);
}

KMED_API kmed_result kmed_data_next(kmed_data_reader *r, kmed_data_record *rec, int *eof,
                                    kmed_error *err)
{
    kmed_result res;
    *eof = 0;
    kmed_data_record_free(rec);
    if (r->done_) { *eof = 1; return KMED_OK; }
    if (r->fmt_ == 0) {
        const kmed_json *v;
        res = kmed_jsonl_next(&r->jsonl_, &v, eof, err);
        if (res || *eof) {
            if (res && err) err->line = r->jsonl_.lines.line;
            return res;
        }
        return kmed_data_from_json(rec, v, r->src, r->src->path, r->jsonl_.lines.line, err);
    }
    if (r->fmt_ == 2) {
        size_t i;
        res = kmed_csv_next(&r->csv_, eof, err);
        if (res || *eof) return res;
        r->row_.type = KMED_JSON_OBJECT;
        r->row_.len = r->csv_.n_cols;
        r->row_.kids = r->row_kids_;
        for (i = 0; i < r->csv_.n_cols; i++) {
            kmed_json *k = &r->row_kids_[i];
            k->type = KMED_JSON_STRING;
            k->str = r->csv_.fields[i].s;
            k->len = r->csv_.fields[i].len;
            k->key = r->csv_.header[i];
            k->key_len = strlen(r->csv_.header[i]);
            /* an empty CSV cell is an absent value, as in the HF exports */
            if (k->len == 0) k->type = KMED_JSON_NULL;
        }
        return kmed_data_from_json(rec, &r->row_, r->src, r->src->path, r->csv_.row_line, err);
    }
    if (!r->arr_) { /* the whole file failed to parse: one malformed record */
        r->done_ = 1;
        if (err) *err = r->err_;
        return r->err_.code ? r->err_.code : KMED_ERR_FORMAT;
    }
    if (r->idx_ >= r->arr_->len) { r->done_ = 1; *eof = 1; return KMED_OK; }
    r->idx_++;
    return kmed_data_from_json(rec, &r->arr_->kids[r->idx_ - 1], r->src, r->src->path,
                               r->idx_, err);
}

KMED_API void kmed_data_close(kmed_data_reader *r)
{
    if (r->fmt_ == 0) kmed_jsonl_close(&r->jsonl_);
    if (r->fmt_ == 2) kmed_csv_close(&r->csv_);
    kmed_json_free(&r->doc_);
    KMED_FREE(r->row_kids_);
    memset(r, 0, sizeof *r);
}

/* ---- hashing and MinHash ---- */

#ifndef KMED_DATA_MAX_PERM
#define KMED_DATA_MAX_PERM 512
#endif

static uint64_t kmed__data_fmix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

KMED_API uint64_t kmed_data_hash64(const void *data, size_t n, uint64_t seed)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t h = seed ^ ((uint64_t)n * 0x9e3779b97f4a7c15ull), w;
    while (n >= 8) {
        memcpy(&w, p, 8);
        h ^= w * 0x87c37b91114253d5ull;
        h = ((h << 27) | (h >> 37)) * 0x4cf5ad432745937full + 0x52dce729u;
        p += 8;
        n -= 8;
    }
    if (n) {
        w = 0;
        memcpy(&w, p, n);
        h ^= w * 0x87c37b91114253d5ull;
        h = ((h << 27) | (h >> 37)) * 0x4cf5ad432745937full + 0x52dce729u;
    }
    return kmed__data_fmix(h);
}

/* Code points of s with ASCII lowercased and whitespace runs as one space, into a new
   array (NULL on allocation failure). */
static uint32_t *kmed__data_cps(const char *s, size_t n, size_t *m, int letters_only)
{
    const unsigned char *u = (const unsigned char *)s;
    uint32_t *cps = (uint32_t *)kmed__calloc(n + 1, sizeof *cps);
    size_t i = 0, k = 0;
    if (!cps) return NULL;
    while (i < n) {
        uint32_t c = kmed__data_utf8_next(u, n, &i);
        if (c < 0x80 && c >= 'A' && c <= 'Z') c |= 0x20;
        if (letters_only) {
            if (!kmed__data_is_letter(c) && !(c >= '0' && c <= '9')) continue;
        } else if (c == ' ' || c == '\n' || c == '\t') {
            if (k == 0 || cps[k - 1] == ' ') continue;
            c = ' ';
        }
        cps[k++] = c;
    }
    if (k && cps[k - 1] == ' ') k--;
    *m = k;
    return cps;
}

/* The permutation constants (odd multiplier, offset) of MinHash slot i. */
static void kmed__data_perm(int i, uint64_t *a, uint64_t *b)
{
    uint64_t x = 0x5eed0000u + (uint64_t)i;
    *a = kmed__splitmix64(&x) | 1;
    *b = kmed__splitmix64(&x);
}

KMED_API void kmed_data_minhash(uint32_t *sig, int num_perm, const char *s, size_t n,
                                int ngram)
{
    uint64_t a[KMED_DATA_MAX_PERM], b[KMED_DATA_MAX_PERM];
    size_t m = 0, i, grams;
    uint32_t *cps;
    int p;
    if (num_perm > KMED_DATA_MAX_PERM) num_perm = KMED_DATA_MAX_PERM;
    if (ngram < 1) ngram = 1;
    for (p = 0; p < num_perm; p++) { sig[p] = 0xFFFFFFFFu; kmed__data_perm(p, &a[p], &b[p]); }
    cps = kmed__data_cps(s, n, &m, 0);
    if (!cps) return;
    grams = m >= (size_t)ngram ? m - (size_t)ngram + 1 : (m ? 1 : 0);
    for (i = 0; i < grams; i++) {
        size_t len = m >= (size_t)ngram ? (size_t)ngram : m;
        uint64_t g = kmed_data_hash64(cps + i, len * sizeof *cps, 0x9a1);
        for (p = 0; p < num_perm; p++) {
            uint32_t v = (uint32_t)((a[p] * g + b[p]) >> 32);
            if (v < sig[p]) sig[p] = v;
        }
    }
    KMED_FREE(cps);
}

KMED_API double kmed_data_minhash_sim(const uint32_t *a, const uint32_t *b, int num_perm)
{
    int i, eq = 0;
    for (i = 0; i < num_perm; i++) eq += a[i] == b[i];
    return num_perm > 0 ? (double)eq / num_perm : 0.0;
}

/* ---- hash sets (open addressing, key 0 = empty) ---- */

static int kmed__data_set_grow(uint64_t **keys, uint32_t **vals, size_t *cap, size_t n)
{
    size_t nc, i;
    uint64_t *nk;
    uint32_t *nv;
    if ((n + 1) * 2 <= *cap) return 1;
    nc = *cap ? *cap * 2 : 1024;
    nk = (uint64_t *)kmed__calloc(nc, sizeof *nk);
    nv = (uint32_t *)kmed__calloc(nc, sizeof *nv);
    if (!nk || !nv) { KMED_FREE(nk); KMED_FREE(nv); return 0; }
    for (i = 0; i < *cap; i++) {
        size_t j;
        if (!(*keys)[i]) continue;
        for (j = (size_t)(*keys)[i] & (nc - 1); nk[j]; j = (j + 1) & (nc - 1)) {}
        nk[j] = (*keys)[i];
        nv[j] = (*vals)[i];
    }
    KMED_FREE(*keys);
    KMED_FREE(*vals);
    *keys = nk;
    *vals = nv;
    *cap = nc;
    return 1;
}

/* Slot of key (its own, or the empty one where it would go); cap must be > 0. */
static size_t kmed__data_set_find(const uint64_t *keys, size_t cap, uint64_t key)
{
    size_t j;
    for (j = (size_t)key & (cap - 1); keys[j] && keys[j] != key; j = (j + 1) & (cap - 1)) {}
    return j;
}

/* ---- dedup ---- */

#define KMED__DATA_NONE 0xFFFFFFFFu

KMED_API kmed_result kmed_data_dedup_init(kmed_data_dedup *d, const kmed_data_dedup_config *cfg,
                                          kmed_error *err)
{
    memset(d, 0, sizeof *d);
    if (cfg) d->cfg = *cfg;
    if (d->cfg.threshold <= 0) d->cfg.threshold = 0.8;
    if (d->cfg.ngram <= 0) d->cfg.ngram = 5;
    if (d->cfg.num_perm <= 0) d->cfg.num_perm = 128;
    if (d->cfg.threshold > 1 || d->cfg.num_perm > KMED_DATA_MAX_PERM)
        return KMED__ERR(err, KMED_ERR_ARG, "dedup: threshold must be in (0, 1] and num_perm "
                         "at most %d", KMED_DATA_MAX_PERM);
    if (d->cfg.bands <= 0) {
        /* most rows per band that still makes a pair at the threshold a candidate with
           probability >= 0.9: P = 1 - (1 - t^r)^b */
        int r;
        for (r = d->cfg.num_perm; r >= 1; r--) {
            int b = d->cfg.num_perm / r;
            if (d->cfg.num_perm % r) continue;
            if (1.0 - pow(1.0 - pow(d->cfg.threshold, r), b) >= 0.9) break;
        }
        d->cfg.bands = d->cfg.num_perm / (r < 1 ? 1 : r);
    }
    if (d->cfg.num_perm % d->cfg.bands)
        return KMED__ERR(err, KMED_ERR_ARG, "dedup: bands (%d) must divide num_perm (%d)",
                         d->cfg.bands, d->cfg.num_perm);
    d->rows = d->cfg.num_perm / d->cfg.bands;
    d->sig_tmp = (uint32_t *)kmed__calloc((size_t)d->cfg.num_perm, sizeof *d->sig_tmp);
    if (!d->sig_tmp) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return KMED_OK;
}

KMED_API void kmed_data_dedup_free(kmed_data_dedup *d)
{
    KMED_FREE(d->ex_keys); KMED_FREE(d->ex_vals); KMED_FREE(d->sigs);
    KMED_FREE(d->bk_keys); KMED_FREE(d->bk_head); KMED_FREE(d->bk_next);
    KMED_FREE(d->sig_tmp);
    memset(d, 0, sizeof *d);
}

/* Exact key: the text without whitespace, ASCII lowercased. */
static uint64_t kmed__data_exact_key(const char *s, size_t n)
{
    char chunk[256];
    size_t i, k = 0;
    uint64_t h = 0x3c6ef372fe94f82bull;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c == ' ' || c == '\n' || c == '\t' || c == '\r') continue;
        if (c >= 'A' && c <= 'Z') c |= 0x20;
        chunk[k++] = c;
        if (k == sizeof chunk) { h = kmed_data_hash64(chunk, k, h); k = 0; }
    }
    h = kmed_data_hash64(chunk, k, h);
    return h ? h : 1;
}

static uint64_t kmed__data_band_key(const uint32_t *sig, int b, int rows)
{
    uint64_t h = kmed_data_hash64(sig + (size_t)b * (size_t)rows, (size_t)rows * sizeof *sig,
                                  (uint64_t)b * 0x9e3779b97f4a7c15ull + 7);
    return h ? h : 1;
}

KMED_API kmed_result kmed_data_dedup_check(kmed_data_dedup *d, const char *s, size_t n,
                                           int add, int *dup, size_t *of, double *sim,
                                           kmed_error *err)
{
    uint64_t ek = 0;
    size_t item;
    int b, nb = d->cfg.bands;
    *dup = 0;
    *of = 0;
    *sim = 0;
    if (!d->cfg.no_exact) {
        ek = kmed__data_exact_key(s, n);
        if (d->ex_cap) {
            size_t j = kmed__data_set_find(d->ex_keys, d->ex_cap, ek);
            if (d->ex_keys[j]) { *dup = 1; *of = d->ex_vals[j]; *sim = 1.0; return KMED_OK; }
        }
    }
    if (!d->cfg.no_near) {
        int checked = 0;
        double best = 0;
        size_t best_item = 0;
        kmed_data_minhash(d->sig_tmp, d->cfg.num_perm, s, n, d->cfg.ngram);
        for (b = 0; b < nb && d->bk_cap; b++) {
            uint64_t key = kmed__data_band_key(d->sig_tmp, b, d->rows);
            size_t j = kmed__data_set_find(d->bk_keys, d->bk_cap, key);
            uint32_t it;
            if (!d->bk_keys[j]) continue;
            /* a bucket can be long when many texts share a band; verifying a bounded
               number keeps the cost per record bounded */
            for (it = d->bk_head[j]; it != KMED__DATA_NONE && checked < 512;
                 it = d->bk_next[(size_t)it * (size_t)nb + (size_t)b]) {
                double e = kmed_data_minhash_sim(d->sig_tmp,
                                                 d->sigs + (size_t)it * (size_t)d->cfg.num_perm,
                                                 d->cfg.num_perm);
                checked++;
                if (e > best) { best = e; best_item = it; }
            }
        }
        if (best >= d->cfg.threshold) {
            *dup = 2;
            *of = best_item;
            *sim = best;
            return KMED_OK;
        }
    }
    if (!add) return KMED_OK;
    item = d->n_items;
    if (item >= KMED__DATA_NONE - 1) return KMED__ERR(err, KMED_ERR_LIMIT, "dedup: too many items");
    if (!d->cfg.no_exact) {
        size_t j;
        if (!kmed__data_set_grow(&d->ex_keys, &d->ex_vals, &d->ex_cap, d->ex_n))
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        j = kmed__data_set_find(d->ex_keys, d->ex_cap, ek);
        d->ex_keys[j] = ek;
        d->ex_vals[j] = (uint32_t)item;
        d->ex_n++;
    }
    if (!d->cfg.no_near) {
        size_t np = (size_t)d->cfg.num_perm;
        if (item >= d->cap_items) {
            size_t nc = d->cap_items ? d->cap_items * 2 : 256;
            uint32_t *ns = (uint32_t *)KMED_REALLOC(d->sigs, nc * np * sizeof *ns);
            uint32_t *nn;
            if (!ns) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            d->sigs = ns;
            nn = (uint32_t *)KMED_REALLOC(d->bk_next, nc * (size_t)nb * sizeof *nn);
            if (!nn) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            d->bk_next = nn;
            d->cap_items = nc;
        }
        memcpy(d->sigs + item * np, d->sig_tmp, np * sizeof *d->sigs);
        for (b = 0; b < nb; b++) {
            uint64_t key = kmed__data_band_key(d->sig_tmp, b, d->rows);
            size_t j;
            if (!kmed__data_set_grow(&d->bk_keys, &d->bk_head, &d->bk_cap, d->bk_n))
                return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            j = kmed__data_set_find(d->bk_keys, d->bk_cap, key);
            if (d->bk_keys[j]) {
                d->bk_next[item * (size_t)nb + (size_t)b] = d->bk_head[j];
            } else {
                d->bk_keys[j] = key;
                d->bk_next[item * (size_t)nb + (size_t)b] = KMED__DATA_NONE;
                d->bk_n++;
            }
            d->bk_head[j] = (uint32_t)item;
        }
    }
    d->n_items++;
    return KMED_OK;
}

/* ---- decontamination ---- */

KMED_API kmed_result kmed_data_decontam_init(kmed_data_decontam *d,
                                             const kmed_data_decontam_config *cfg,
                                             kmed_error *err)
{
    kmed_data_dedup_config dc;
    memset(d, 0, sizeof *d);
    if (cfg) d->cfg = *cfg;
    if (d->cfg.word_n <= 0) d->cfg.word_n = 13;
    if (d->cfg.char_n <= 0) d->cfg.char_n = 50;
    if (d->cfg.threshold <= 0) d->cfg.threshold = 0.8;
    memset(&dc, 0, sizeof dc);
    dc.no_exact = 1;
    dc.threshold = d->cfg.threshold;
    return kmed_data_dedup_init(&d->near, &dc, err);
}

KMED_API void kmed_data_decontam_free(kmed_data_decontam *d)
{
    size_t i;
    for (i = 0; i < d->n_items; i++) KMED_FREE(d->ids[i]);
    KMED_FREE(d->ids);
    KMED_FREE(d->keys);
    KMED_FREE(d->vals);
    kmed_data_dedup_free(&d->near);
    memset(d, 0, sizeof *d);
}

/* Calls fn for the hash of every word n-gram (words: runs of letters and digits) and
   every character n-gram over the Hangul and Han characters. Stops early when fn returns non-zero
   and passes that value on; -1 on allocation failure. */
typedef int (*kmed__data_gram_fn)(kmed_data_decontam *d, uint64_t h, size_t item);
static int kmed__data_grams(kmed_data_decontam *d, const char *s, size_t n, size_t item,
                            kmed__data_gram_fn fn)
{
    size_t m = 0, i, nw = 0, start = 0;
    uint32_t *cps = kmed__data_cps(s, n, &m, 0);
    uint64_t *words;
    int rc = 0;
    if (!cps) return -1;
    words = (uint64_t *)kmed__calloc(m + 1, sizeof *words);
    if (!words) { KMED_FREE(cps); return -1; }
    for (i = 0; i <= m; i++) {
        int w = i < m && (kmed__data_is_letter(cps[i]) || (cps[i] >= '0' && cps[i] <= '9'));
        if (w) continue;
        if (i > start) words[nw++] = kmed_data_hash64(cps + start, (i - start) * 4, 0x77);
        start = i + 1;
    }
    for (i = 0; nw >= (size_t)d->cfg.word_n && i + (size_t)d->cfg.word_n <= nw && !rc; i++)
        rc = fn(d, kmed_data_hash64(words + i, (size_t)d->cfg.word_n * 8, 0x3001) | 1, item);
    /* character n-grams over Hangul and Han characters only: Korean writes long words
       with few spaces, so words are a poor unit; Latin text is covered by word n-grams */
    if (!rc) {
        size_t k = 0;
        for (i = 0; i < m; i++)
            if (kmed__data_is_hangul(cps[i]) || (cps[i] >= 0x4E00 && cps[i] <= 0x9FFF) ||
                (cps[i] >= 0x3400 && cps[i] <= 0x4DBF))
                cps[k++] = cps[i];
        for (i = 0; k >= (size_t)d->cfg.char_n && i + (size_t)d->cfg.char_n <= k && !rc; i++)
            rc = fn(d, kmed_data_hash64(cps + i, (size_t)d->cfg.char_n * 4, 0xC4A2) & ~(uint64_t)1,
                    item);
    }
    KMED_FREE(words);
    KMED_FREE(cps);
    return rc;
}

static int kmed__data_gram_add(kmed_data_decontam *d, uint64_t h, size_t item)
{
    size_t j;
    if (!h) h = 2;
    if (!kmed__data_set_grow(&d->keys, &d->vals, &d->cap, d->n)) return -1;
    j = kmed__data_set_find(d->keys, d->cap, h);
    if (!d->keys[j]) { d->keys[j] = h; d->vals[j] = (uint32_t)item; d->n++; }
    return 0;
}

/* Returns 1 (word) or 2 (char) n-gram hit, storing the item in d->scratch_item_. */
static int kmed__data_gram_hit(kmed_data_decontam *d, uint64_t h, size_t item)
{
    size_t j;
    (void)item;
    if (!h) h = 2;
    if (!d->cap) return 0;
    j = kmed__data_set_find(d->keys, d->cap, h);
    if (!d->keys[j]) return 0;
    d->hit_item_ = d->vals[j];
    return (h & 1) ? 1 : 2;
}

KMED_API kmed_result kmed_data_decontam_add(kmed_data_decontam *d, const char *id,
                                            const char *text, size_t n, const char *question,
                                            size_t qn, kmed_error *err)
{
    int dup;
    size_t of;
    double sim;
    kmed_result r;
    if (d->n_items >= d->cap_items) {
        size_t nc = d->cap_items ? d->cap_items * 2 : 64;
        char **ni = (char **)KMED_REALLOC(d->ids, nc * sizeof *ni);
        if (!ni) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        d->ids = ni;
        d->cap_items = nc;
    }
    d->ids[d->n_items] = kmed__data_strdup(id ? id : "");
    if (!d->ids[d->n_items]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    if (kmed__data_grams(d, text, n, d->n_items, kmed__data_gram_add) < 0) {
        KMED_FREE(d->ids[d->n_items]);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    /* every eval question goes in the near index (not only the first of a duplicate group)
       so the item reported is the one it resembles */
    if (d->near.n_items != d->n_items) {
        KMED_FREE(d->ids[d->n_items]);
        return KMED__ERR(err, KMED_ERR_STATE, "decontam: index out of step");
    }
    {
        kmed_data_dedup_config keep = d->near.cfg;
        d->near.cfg.threshold = 2.0; /* never a duplicate: always added */
        r = kmed_data_dedup_check(&d->near, question ? question : "", question ? qn : 0, 1,
                                  &dup, &of, &sim, err);
        d->near.cfg = keep;
    }
    if (r) { KMED_FREE(d->ids[d->n_items]); return r; }
    d->n_items++;
    return KMED_OK;
}

KMED_API int kmed_data_decontam_check(kmed_data_decontam *d, const char *text, size_t n,
                                      const char *question, size_t qn, size_t *item,
                                      double *sim)
{
    int rc, dup = 0;
    size_t of = 0;
    *item = 0;
    *sim = 0;
    if (!d->n_items) return 0;
    rc = kmed__data_grams(d, text, n, 0, kmed__data_gram_hit);
    if (rc > 0) { *item = d->hit_item_; *sim = 1.0; return rc; }
    if (question && qn &&
        kmed_data_dedup_check(&d->near, question, qn, 0, &dup, &of, sim, NULL) == KMED_OK &&
        dup == 2) {
        *item = of;
        return 3;
    }
    return 0;
}

/* ---- record cleaning and views ---- */

static kmed_result kmed__data_clean_field(char **f, int flags)
{
    kmed_buf b = {0};
    if (!*f) return KMED_OK;
    kmed_data_clean_text(&b, *f, strlen(*f), flags);
    if (b.failed) { kmed_buf_free(&b); return KMED_ERR_NOMEM; }
    KMED_FREE(*f);
    *f = b.len ? b.data : NULL;
    if (!b.len) kmed_buf_free(&b);
    return KMED_OK;
}

KMED_API kmed_result kmed_data_record_clean(kmed_data_record *rec, int strip_html,
                                            kmed_error *err)
{
    int h = strip_html || rec->kind == KMED_DATA_DICT ? KMED_DATA_CLEAN_HTML : 0;
    int one = h | KMED_DATA_CLEAN_ONELINE;
    size_t i, k;
    int o;
    kmed_result r = KMED_OK;
    char **one_line[] = {&rec->subset, &rec->split, &rec->subject, &rec->lang, &rec->title,
                         &rec->answer_text};
    char **multi[] = {&rec->question, &rec->symptoms, &rec->explanation};
    for (i = 0; i < sizeof one_line / sizeof one_line[0] && !r; i++)
        r = kmed__data_clean_field(one_line[i], one);
    for (i = 0; i < sizeof multi / sizeof multi[0] && !r; i++)
        r = kmed__data_clean_field(multi[i], h);
    for (o = 0; o < rec->n_options && !r; o++) r = kmed__data_clean_field(&rec->options[o], one);
    for (i = 0; i < rec->n_turns && !r; i++) r = kmed__data_clean_field(&rec->turns[i].text, h);
    for (i = k = 0; i < rec->n_sections && !r; i++) {
        r = kmed__data_clean_field(&rec->sections[i].text, h);
        if (!r && rec->sections[i].key && rec->sections[i].key[0])
            r = kmed__data_clean_field(&rec->sections[i].key, one);
        if (r) break;
        if (!rec->sections[i].text) { KMED_FREE(rec->sections[i].key); continue; }
        rec->sections[k++] = rec->sections[i];
    }
    if (r) return KMED__ERR(err, r, "out of memory");
    rec->n_sections = k;
    /* what must survive cleaning for the record to still make sense */
    switch (rec->kind) {
    case KMED_DATA_MCQA:
    case KMED_DATA_EXPQA:
        if (!rec->question) return KMED__ERR(err, KMED_ERR_FORMAT, "question empty after cleaning");
        for (o = 0; o < rec->n_options; o++)
            if (!rec->options[o])
                return KMED__ERR(err, KMED_ERR_FORMAT, "option %c empty after cleaning", 'A' + o);
        break;
    case KMED_DATA_CONV:
    case KMED_DATA_COD:
        for (i = 0; i < rec->n_turns; i++)
            if (!rec->turns[i].text)
                return KMED__ERR(err, KMED_ERR_FORMAT, "turn %zu empty after cleaning", i + 1);
        if (!rec->n_turns && ((!rec->question && !rec->symptoms) || !rec->answer_text))
            return KMED__ERR(err, KMED_ERR_FORMAT, "case or diagnosis empty after cleaning");
        break;
    default:
        if (!rec->title || !rec->n_sections)
            return KMED__ERR(err, KMED_ERR_FORMAT, "name or sections empty after cleaning");
        break;
    }
    return KMED_OK;
}

static void kmed__data_line(kmed_buf *out, const char *s)
{
    if (!s || !*s) return;
    if (out->len) kmed_buf_put(out, "\n", 1);
    kmed_buf_puts(out, s);
}

KMED_API void kmed_data_record_text(const kmed_data_record *rec, kmed_buf *out)
{
    size_t i;
    int o;
    kmed_buf_put(out, "", 0);
    kmed__data_line(out, rec->title);
    kmed__data_line(out, rec->question);
    kmed__data_line(out, rec->symptoms);
    for (o = 0; o < rec->n_options; o++) kmed__data_line(out, rec->options[o]);
    kmed__data_line(out, rec->answer_text);
    kmed__data_line(out, rec->explanation);
    for (i = 0; i < rec->n_turns; i++) kmed__data_line(out, rec->turns[i].text);
    for (i = 0; i < rec->n_sections; i++) {
        kmed__data_line(out, rec->sections[i].key);
        kmed__data_line(out, rec->sections[i].text);
    }
}

KMED_API void kmed_data_record_question(const kmed_data_record *rec, kmed_buf *out)
{
    kmed_buf_put(out, "", 0);
    if (rec->question) kmed_buf_puts(out, rec->question);
    else if (rec->n_turns) kmed_buf_puts(out, rec->turns[0].text);
    else if (rec->symptoms) kmed_buf_puts(out, rec->symptoms);
    else if (rec->title) kmed_buf_puts(out, rec->title);
}

/* ---- harmful-content filter ---- */

static const char *const kmed__data_harm_defaults[][2] = {
    {"self_harm", "자살 방법"}, {"self_harm", "자살하는 방법"}, {"self_harm", "자살하는 법"},
    {"self_harm", "고통 없이 죽는"}, {"self_harm", "죽는 방법"}, {"self_harm", "손목 긋는"},
    {"self_harm", "목 매는 방법"}, {"self_harm", "how to kill myself"},
    {"self_harm", "painless way to die"}, {"self_harm", "how to commit suicide"},
    {"self_harm", "ways to commit suicide"},
    {"drugs", "필로폰 만드는"}, {"drugs", "필로폰 제조"}, {"drugs", "마약 제조법"},
    {"drugs", "마약 만드는 법"}, {"drugs", "마약 만드는 방법"}, {"drugs", "메스암페타민 합성"},
    {"drugs", "메스암페타민 제조"}, {"drugs", "펜타닐 합성"}, {"drugs", "펜타닐 제조"},
    {"drugs", "how to make meth"}, {"drugs", "how to cook meth"},
    {"drugs", "synthesize methamphetamine"}, {"drugs", "methamphetamine synthesis route"},
    {"drugs", "how to make fentanyl"},
    {"dosing", "치사량만큼"}, {"dosing", "치사량을 먹"}, {"dosing", "과다복용하는 방법"},
    {"dosing", "과다복용 방법"}, {"dosing", "들키지 않게 과다복용"},
    {"dosing", "몇 알 먹으면 죽"}, {"dosing", "한꺼번에 먹으면 죽"},
    {"dosing", "overdose on purpose"}, {"dosing", "how many pills to die"},
    {"dosing", "lethal dose to kill"},
    {"abuse", "씨발"}, {"abuse", "시발놈"}, {"abuse", "개새끼"}, {"abuse", "병신새끼"},
    {"abuse", "좆같"}, {"abuse", "미친년"}, {"abuse", "fuck you"}, {"abuse", "motherfucker"}};

/* Whitespace removed, ASCII lowercased (new string). */
static char *kmed__data_squash(const char *s, size_t n)
{
    char *o = (char *)KMED_MALLOC(n + 1);
    size_t i, k = 0;
    if (!o) return NULL;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c == ' ' || c == '\n' || c == '\t' || c == '\r') continue;
        o[k++] = (char)(c >= 'A' && c <= 'Z' ? c | 0x20 : c);
    }
    o[k] = 0;
    return o;
}

KMED_API kmed_result kmed_data_safety_init(kmed_data_safety *s, int with_defaults,
                                           kmed_error *err)
{
    size_t i;
    memset(s, 0, sizeof *s);
    if (!with_defaults) return KMED_OK;
    for (i = 0; i < sizeof kmed__data_harm_defaults / sizeof kmed__data_harm_defaults[0]; i++) {
        kmed_result r = kmed_data_safety_add(s, kmed__data_harm_defaults[i][0],
                                             kmed__data_harm_defaults[i][1], err);
        if (r) { kmed_data_safety_free(s); return r; }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_data_safety_add(kmed_data_safety *s, const char *category,
                                          const char *phrase, kmed_error *err)
{
    char *c, *p;
    if (!category || !phrase) return KMED__ERR(err, KMED_ERR_ARG, "safety: NULL phrase");
    p = kmed__data_squash(phrase, strlen(phrase));
    if (p && !*p) { KMED_FREE(p); return KMED__ERR(err, KMED_ERR_ARG, "safety: empty phrase"); }
    c = kmed__data_strdup(category);
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        char **a = (char **)KMED_REALLOC(s->category, nc * sizeof *a), **b;
        if (a) s->category = a;
        b = a ? (char **)KMED_REALLOC(s->phrase, nc * sizeof *b) : NULL;
        if (b) s->phrase = b;
        if (a && b) s->cap = nc;
    }
    if (!c || !p || s->n == s->cap) {
        KMED_FREE(c);
        KMED_FREE(p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    s->category[s->n] = c;
    s->phrase[s->n] = p;
    s->n++;
    return KMED_OK;
}

KMED_API int kmed_data_safety_check(const kmed_data_safety *s, const char *text, size_t n,
                                    const char **category, const char **phrase)
{
    char *sq;
    size_t i, m;
    int hit = 0;
    if (!s || !s->n) return 0;
    sq = kmed__data_squash(text, n);
    if (!sq) return 0;
    m = strlen(sq);
    for (i = 0; i < s->n && !hit; i++) {
        const char *p = s->phrase[i], *q = sq;
        size_t pl = strlen(p);
        while (pl <= m - (size_t)(q - sq) && (q = (const char *)memchr(q, p[0],
                                                   m - (size_t)(q - sq))) != NULL) {
            if (m - (size_t)(q - sq) >= pl && memcmp(q, p, pl) == 0) { hit = 1; break; }
            q++;
        }
        if (hit) {
            if (category) *category = s->category[i];
            if (phrase) *phrase = s->phrase[i];
        }
    }
    KMED_FREE(sq);
    return hit;
}

KMED_API void kmed_data_safety_free(kmed_data_safety *s)
{
    size_t i;
    for (i = 0; i < s->n; i++) { KMED_FREE(s->category[i]); KMED_FREE(s->phrase[i]); }
    KMED_FREE(s->category);
    KMED_FREE(s->phrase);
    memset(s, 0, sizeof *s);
}

KMED_API const char *kmed_data_disclaimer(int korean)
{
    return korean ? "※ 이 답변은 일반적인 의학 정보이며 진단이나 치료를 대신하지 않습니다. "
                    "증상이 있거나 치료가 필요하면 의사 등 의료 전문가와 상담하세요."
                  : "Note: this is general medical information, not a diagnosis or treatment. "
                    "Please see a doctor or other health professional about your symptoms.";
}

/* ---- formatting ---- */

static void kmed__data_json_kv(kmed_buf *b, const char *k, const char *v)
{
    kmed_buf_json_str(b, k, strlen(k));
    kmed_buf_put(b, ":", 1);
    kmed_buf_json_str(b, v ? v : "", v ? strlen(v) : 0);
}

static void kmed__data_head(kmed_buf *b, const kmed_data_record *rec)
{
    kmed_buf_put(b, "{", 1);
    kmed__data_json_kv(b, "id", rec->id);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "source", rec->source);
}

static int kmed__data_is_korean(const char *s)
{
    return s && kmed_data_korean_share(s, strlen(s)) >= 0.3;
}

/* question + "\nA. opt" lines (+ the answer cue for chat examples). The cue is the one lm-eval's kormedmcqa
   prompt ends with ("정답：", fullwidth colon), so a fine-tuned model answers the
   evaluation's prompt exactly as it was trained to. */
static void kmed__data_mcq_prompt(kmed_buf *b, const kmed_data_record *rec, int cue)
{
    int o;
    kmed_buf_puts(b, rec->question);
    for (o = 0; o < rec->n_options; o++) kmed_buf_printf(b, "\n%c. %s", 'A' + o, rec->options[o]);
    if (cue) kmed_buf_puts(b, kmed__data_is_korean(rec->question) ? "\n\xec\xa0\x95\xeb\x8b\xb5\xef\xbc\x9a"
                                                          : "\nAnswer:");
}

static void kmed__data_mcq_answer(kmed_buf *b, const kmed_data_record *rec, int label)
{
    int ko = kmed__data_is_korean(rec->question);
    if (label) kmed_buf_puts(b, ko ? "정답: " : "Answer: ");
    kmed_buf_printf(b, "%c. %s", 'A' + rec->answer - 1, rec->options[rec->answer - 1]);
    if (rec->explanation)
        kmed_buf_printf(b, "\n\n%s%s", label ? (ko ? "해설: " : "Explanation: ") : "",
                        rec->explanation);
}

static void kmed__data_case_prompt(kmed_buf *b, const kmed_data_record *rec, int instr)
{
    int ko = kmed__data_is_korean(rec->question ? rec->question : rec->symptoms);
    if (instr)
        kmed_buf_puts(b, ko ? "다음 환자에게 가장 가능성이 높은 진단은 무엇입니까?\n\n"
                            : "What is the most likely diagnosis for this patient?\n\n");
    if (rec->question) kmed_buf_puts(b, rec->question);
    if (rec->symptoms)
        kmed_buf_printf(b, "%s%s%s", rec->question ? "\n" : "", ko ? "증상: " : "Symptoms: ",
                        rec->symptoms);
}

static void kmed__data_case_answer(kmed_buf *b, const kmed_data_record *rec)
{
    int ko = kmed__data_is_korean(rec->question ? rec->question : rec->symptoms);
    kmed_buf_printf(b, "%s%s", ko ? "진단: " : "Diagnosis: ", rec->answer_text);
    if (rec->explanation) kmed_buf_printf(b, "\n\n%s", rec->explanation);
}

static void kmed__data_msg(kmed_buf *b, int first, const char *role, const char *content,
                           size_t n)
{
    kmed_buf_puts(b, first ? "{\"role\":" : ",{\"role\":");
    kmed_buf_json_str(b, role, strlen(role));
    kmed_buf_puts(b, ",\"content\":");
    kmed_buf_json_str(b, content, n);
    kmed_buf_put(b, "}", 1);
}

KMED_API kmed_result kmed_data_format_sft(const kmed_data_record *rec, const char *disclaimer,
                                          kmed_buf *out, kmed_error *err)
{
    kmed_buf u = {0}, a = {0};
    size_t i;
    int disc = disclaimer && *disclaimer &&
               (rec->kind == KMED_DATA_CONV || rec->kind == KMED_DATA_COD);
    if (rec->kind == KMED_DATA_DICT)
        return KMED__ERR(err, KMED_ERR_ARG, "%s: a dictionary entry is not a chat example",
                         rec->id ? rec->id : "?");
    kmed__data_head(out, rec);
    kmed_buf_puts(out, ",\"messages\":[");
    if (rec->n_turns) {
        for (i = 0; i < rec->n_turns; i++) {
            const char *t = rec->turns[i].text;
            if (disc && i + 1 == rec->n_turns) {
                kmed_buf_free(&a);
                kmed_buf_printf(&a, "%s\n\n%s", t, disclaimer);
                t = a.data ? a.data : "";
            }
            kmed__data_msg(out, i == 0, rec->turns[i].key, t, strlen(t));
        }
    } else if (rec->kind == KMED_DATA_COD) {
        kmed__data_case_prompt(&u, rec, 1);
        kmed__data_case_answer(&a, rec);
        if (disc) kmed_buf_printf(&a, "\n\n%s", disclaimer);
    } else {
        kmed__data_mcq_prompt(&u, rec, 1);
        kmed__data_mcq_answer(&a, rec, 0);
    }
    if (!rec->n_turns) {
        kmed__data_msg(out, 1, "user", u.data ? u.data : "", u.len);
        kmed__data_msg(out, 0, "assistant", a.data ? a.data : "", a.len);
    }
    kmed_buf_puts(out, "]}\n");
    kmed_buf_free(&u);
    kmed_buf_free(&a);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

KMED_API kmed_result kmed_data_format_cpt(const kmed_data_record *rec, kmed_buf *out,
                                          kmed_error *err)
{
    kmed_buf t = {0};
    size_t i;
    switch (rec->kind) {
    case KMED_DATA_DICT:
        kmed_buf_puts(&t, rec->title);
        for (i = 0; i < rec->n_sections; i++) {
            kmed_buf_put(&t, "\n\n", 2);
            if (rec->sections[i].key && rec->sections[i].key[0])
                kmed_buf_printf(&t, "%s\n", rec->sections[i].key);
            kmed_buf_puts(&t, rec->sections[i].text);
        }
        break;
    case KMED_DATA_MCQA:
    case KMED_DATA_EXPQA:
        kmed__data_mcq_prompt(&t, rec, 0);
        kmed_buf_put(&t, "\n", 1);
        kmed__data_mcq_answer(&t, rec, 1);
        break;
    default:
        if (rec->n_turns) {
            for (i = 0; i < rec->n_turns; i++) {
                if (i) kmed_buf_put(&t, "\n\n", 2);
                kmed_buf_puts(&t, rec->turns[i].text);
            }
        } else {
            kmed__data_case_prompt(&t, rec, 0);
            kmed_buf_put(&t, "\n", 1);
            kmed__data_case_answer(&t, rec);
        }
        break;
    }
    kmed__data_head(out, rec);
    kmed_buf_puts(out, ",\"text\":");
    kmed_buf_json_str(out, t.data ? t.data : "", t.len);
    kmed_buf_puts(out, "}\n");
    if (t.failed) out->failed = 1;
    kmed_buf_free(&t);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

/* ---- packing ---- */

/* Encodes text into p->tmp[0..*n), growing it as the encoder asks. */
static kmed_result kmed__data_encode(kmed_data_packer *p, const char *s, size_t n, size_t *cnt,
                                     kmed_error *err)
{
    kmed_result r;
    *cnt = 0;
    if (!n) return KMED_OK;
    for (;;) {
        r = p->cfg.encode(p->cfg.encode_user, s, n, p->tmp, p->tmp_cap, cnt, err);
        if (r != KMED_ERR_SPACE) return r;
        if (*cnt <= p->tmp_cap) return KMED__ERR(err, KMED_ERR_STATE, "encoder: bad size");
        {
            int *nt = (int *)KMED_REALLOC(p->tmp, *cnt * sizeof *nt);
            if (!nt) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            p->tmp = nt;
            p->tmp_cap = *cnt;
        }
    }
}

static int kmed__data_ex_push(kmed_data_packer *p, const int *ids, size_t n, int trained)
{
    size_t i;
    if (p->ex_n + n > p->ex_cap) {
        size_t nc = p->ex_cap ? p->ex_cap : 256;
        int *a, *b;
        while (nc < p->ex_n + n) nc *= 2;
        a = (int *)KMED_REALLOC(p->ex_ids, nc * sizeof *a);
        if (!a) return 0;
        p->ex_ids = a;
        b = (int *)KMED_REALLOC(p->ex_lab, nc * sizeof *b);
        if (!b) return 0;
        p->ex_lab = b;
        p->ex_cap = nc;
    }
    for (i = 0; i < n; i++) {
        p->ex_ids[p->ex_n + i] = ids[i];
        p->ex_lab[p->ex_n + i] = trained ? ids[i] : -100;
    }
    p->ex_n += n;
    return 1;
}

static kmed_result kmed__data_copy_ids(kmed_data_packer *p, const char *s, int **out, size_t *n,
                                       kmed_error *err)
{
    kmed_result r = kmed__data_encode(p, s, strlen(s), n, err);
    if (r) return r;
    *out = (int *)kmed__calloc(*n ? *n : 1, sizeof **out);
    if (!*out) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    memcpy(*out, p->tmp, *n * sizeof **out);
    return KMED_OK;
}

KMED_API kmed_result kmed_data_pack_init(kmed_data_packer *p, const kmed_data_pack_config *cfg,
                                         kmed_error *err)
{
    kmed_result r;
    memset(p, 0, sizeof *p);
    p->cfg = *cfg;
    if (!p->cfg.encode) return KMED__ERR(err, KMED_ERR_ARG, "packing needs an encode function");
    if (!p->cfg.seq_len) p->cfg.seq_len = 1024;
    if (!p->cfg.bos_id) p->cfg.bos_id = 2;
    if (!p->cfg.eos_id) p->cfg.eos_id = 1;
    if (!p->cfg.sot_id) p->cfg.sot_id = 106;
    if (!p->cfg.eot_id) p->cfg.eot_id = 107;
    if (p->cfg.seq_len < 8 || p->cfg.seq_len > ((size_t)1 << 24))
        return KMED__ERR(err, KMED_ERR_ARG, "seq_len %zu out of range [8, 2^24]", p->cfg.seq_len);
    p->ids = (int *)kmed__calloc(p->cfg.seq_len, sizeof *p->ids);
    p->labels = (int *)kmed__calloc(p->cfg.seq_len, sizeof *p->labels);
    p->tmp_cap = 1024;
    p->tmp = (int *)kmed__calloc(p->tmp_cap, sizeof *p->tmp);
    if (!p->ids || !p->labels || !p->tmp) {
        kmed_data_pack_free(p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    if ((r = kmed__data_copy_ids(p, "model\n", &p->model_prefix, &p->n_model_prefix, err)) ||
        (r = kmed__data_copy_ids(p, "user\n", &p->user_prefix, &p->n_user_prefix, err)) ||
        (r = kmed__data_copy_ids(p, "\n", &p->nl, &p->n_nl, err))) {
        kmed_data_pack_free(p);
        return r;
    }
    return KMED_OK;
}

KMED_API void kmed_data_pack_free(kmed_data_packer *p)
{
    KMED_FREE(p->ids); KMED_FREE(p->labels); KMED_FREE(p->tmp);
    KMED_FREE(p->ex_ids); KMED_FREE(p->ex_lab);
    KMED_FREE(p->model_prefix); KMED_FREE(p->user_prefix); KMED_FREE(p->nl);
    memset(p, 0, sizeof *p);
}

static void kmed__data_emit(kmed_data_packer *p, kmed_buf *out)
{
    size_t i;
    for (i = p->fill; i < p->cfg.seq_len; i++) {
        p->ids[i] = p->cfg.pad_id;
        p->labels[i] = -100;
        p->n_pad++;
    }
    kmed_buf_puts(out, "{\"input_ids\":[");
    for (i = 0; i < p->cfg.seq_len; i++) kmed_buf_printf(out, i ? ",%d" : "%d", p->ids[i]);
    kmed_buf_puts(out, "],\"labels\":[");
    for (i = 0; i < p->cfg.seq_len; i++) kmed_buf_printf(out, i ? ",%d" : "%d", p->labels[i]);
    kmed_buf_puts(out, "]}\n");
    p->n_seqs++;
    p->fill = 0;
}

/* One chat turn: <start_of_turn>role\ncontent<end_of_turn>\n. For the model, the tokens
   of the content and <end_of_turn> are trained; "model\n" is found as the common id
   prefix of encode("model\n") and encode("model\n" + content), so a merge across the
   boundary can never make a prompt token trained or drop a reply token. */
static kmed_result kmed__data_pack_turn(kmed_data_packer *p, const char *role,
                                        const char *content, size_t cn, kmed_error *err)
{
    int model = strcmp(role, "assistant") == 0 || strcmp(role, "model") == 0;
    const char *head = model ? "model\n" : (strcmp(role, "user") == 0 ? "user\n" : NULL);
    kmed_buf t = {0};
    size_t n, k = 0;
    kmed_result r;
    if (!head) return KMED__ERR(err, KMED_ERR_FORMAT, "role '%s' is not user or assistant", role);
    kmed_buf_puts(&t, head);
    kmed_buf_put(&t, content, cn);
    if (t.failed) { kmed_buf_free(&t); return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); }
    r = kmed__data_encode(p, t.data, t.len, &n, err);
    kmed_buf_free(&t);
    if (r) return r;
    if (model)
        while (k < n && k < p->n_model_prefix && p->tmp[k] == p->model_prefix[k]) k++;
    else
        k = n;
    if (!kmed__data_ex_push(p, &p->cfg.sot_id, 1, 0) || !kmed__data_ex_push(p, p->tmp, k, 0) ||
        !kmed__data_ex_push(p, p->tmp + k, n - k, 1) ||
        !kmed__data_ex_push(p, &p->cfg.eot_id, 1, model) ||
        !kmed__data_ex_push(p, p->nl, p->n_nl, 0))
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return KMED_OK;
}

KMED_API kmed_result kmed_data_pack_add(kmed_data_packer *p, const kmed_json *example,
                                        kmed_buf *out, kmed_error *err)
{
    const kmed_json *text = kmed_json_get(example, "text");
    const kmed_json *msgs = kmed_json_get(example, "messages");
    size_t i, at = 0, L = p->cfg.seq_len;
    kmed_result r;
    int chat;
    p->ex_n = 0;
    if (!kmed__data_ex_push(p, &p->cfg.bos_id, 1, 0))
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    if (msgs && msgs->type == KMED_JSON_ARRAY) {
        chat = 1;
        for (i = 0; i < msgs->len; i++) {
            const kmed_json *m = &msgs->kids[i];
            const kmed_json *c = kmed_json_get(m, "content");
            const char *role = kmed_json_str(kmed_json_get(m, "role"), NULL);
            if (!role || !c || c->type != KMED_JSON_STRING)
                return KMED__ERR(err, KMED_ERR_FORMAT, "message %zu: expected role and content",
                                 i + 1);
            if ((r = kmed__data_pack_turn(p, role, c->str, c->len, err))) return r;
        }
    } else if (text && text->type == KMED_JSON_STRING) {
        size_t n;
        chat = 0;
        if ((r = kmed__data_encode(p, text->str, text->len, &n, err))) return r;
        if (!kmed__data_ex_push(p, p->tmp, n, 1) || !kmed__data_ex_push(p, &p->cfg.eos_id, 1, 1))
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    } else {
        return KMED__ERR(err, KMED_ERR_FORMAT, "example has neither \"text\" nor \"messages\"");
    }
    p->n_examples++;
    if (p->ex_n > L && (chat || p->cfg.truncate_long)) {
        p->ex_n = L;
        p->n_truncated++;
    }
    /* a chat example that does not fit in what is left starts a new sequence; a document
       fills the sequence and continues in the next */
    if ((chat || p->cfg.truncate_long) && p->fill + p->ex_n > L) kmed__data_emit(p, out);
    while (at < p->ex_n) {
        size_t take = p->ex_n - at;
        if (take > L - p->fill) take = L - p->fill;
        memcpy(p->ids + p->fill, p->ex_ids + at, take * sizeof *p->ids);
        memcpy(p->labels + p->fill, p->ex_lab + at, take * sizeof *p->labels);
        for (i = 0; i < take; i++) p->n_trained += p->ex_lab[at + i] != -100;
        p->n_tokens += take;
        p->fill += take;
        at += take;
        if (p->fill == L) kmed__data_emit(p, out);
    }
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

KMED_API kmed_result kmed_data_pack_finish(kmed_data_packer *p, kmed_buf *out, kmed_error *err)
{
    if (p->fill) kmed__data_emit(p, out);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

/* ---- the pipeline ---- */

static const char *const kmed__data_drop_names[KMED_DATA_DROP_N][2] = {
    {"malformed", "read"}, {"split", "read"}, {"empty", "clean"}, {"too_short", "filter"},
    {"too_long", "filter"}, {"not_korean", "filter"}, {"harmful", "safety"},
    {"contam_ngram", "decontam"}, {"contam_near", "decontam"}, {"exact_dup", "dedup"},
    {"near_dup", "dedup"}, {"mix", "mix"}};

KMED_API const char *kmed_data_drop_name(kmed_data_drop d)
{
    return (unsigned)d < KMED_DATA_DROP_N ? kmed__data_drop_names[d][0] : "?";
}

KMED_API const char *kmed_data_drop_stage(kmed_data_drop d)
{
    return (unsigned)d < KMED_DATA_DROP_N ? kmed__data_drop_names[d][1] : "?";
}

KMED_API kmed_result kmed_data_config_add_source(kmed_data_config *cfg, int eval,
                                                 kmed_data_source **out, kmed_error *err)
{
    kmed_data_source **v = eval ? &cfg->evals : &cfg->sources;
    size_t *n = eval ? &cfg->n_evals : &cfg->n_sources;
    kmed_data_source *nv = (kmed_data_source *)KMED_REALLOC(*v, (*n + 1) * sizeof *nv);
    if (!nv) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    *v = nv;
    memset(&nv[*n], 0, sizeof nv[*n]);
    *out = &nv[(*n)++];
    return KMED_OK;
}

KMED_API void kmed_data_config_free(kmed_data_config *cfg)
{
    KMED_FREE(cfg->sources);
    KMED_FREE(cfg->evals);
    if (cfg->safety_extra) {
        kmed_data_safety_free(cfg->safety_extra);
        KMED_FREE(cfg->safety_extra);
    }
    cfg->sources = cfg->evals = NULL;
    cfg->n_sources = cfg->n_evals = 0;
    cfg->safety_extra = NULL;
}

/* Copies a config string into a fixed field; KMED_ERR_LIMIT if it does not fit. */
static kmed_result kmed__data_cfg_str(char *dst, size_t cap, const kmed_json *v, const char *dir,
                                      const char *what, const char *file, kmed_error *err)
{
    const char *s = kmed_json_str(v, NULL);
    int n;
    if (!s) return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                                  "'%s' must be a string", what);
    if (dir && dir[0] && s[0] != '/') n = snprintf(dst, cap, "%s/%s", dir, s);
    else n = snprintf(dst, cap, "%s", s);
    if (n < 0 || (size_t)n >= cap)
        return kmed_error_set(err, KMED_ERR_LIMIT, file, 0, (size_t)-1, "'%s' is too long", what);
    return KMED_OK;
}

static kmed_result kmed__data_cfg_source(kmed_data_source *s, const kmed_json *o, const char *dir,
                                         const char *file, kmed_error *err)
{
    const kmed_json *v;
    kmed_result r;
    size_t i;
    if (!o || o->type != KMED_JSON_OBJECT)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "each source must be an object");
    if (!(v = kmed_json_get(o, "kind")) || !kmed_json_str(v, NULL))
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "a source needs \"kind\"");
    if ((r = kmed_data_kind_parse(kmed_json_str(v, ""), &s->kind, err))) return r;
    if (!(v = kmed_json_get(o, "path")))
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "a source needs \"path\"");
    if ((r = kmed__data_cfg_str(s->path, sizeof s->path, v, dir, "path", file, err))) return r;
    if ((v = kmed_json_get(o, "name")) &&
        (r = kmed__data_cfg_str(s->name, sizeof s->name, v, NULL, "name", file, err))) return r;
    if ((v = kmed_json_get(o, "subset")) &&
        (r = kmed__data_cfg_str(s->subset, sizeof s->subset, v, NULL, "subset", file, err)))
        return r;
    if ((v = kmed_json_get(o, "split")) &&
        (r = kmed__data_cfg_str(s->split, sizeof s->split, v, NULL, "split", file, err))) return r;
    if ((v = kmed_json_get(o, "splits"))) {
        kmed_buf b = {0};
        if (v->type == KMED_JSON_ARRAY) {
            for (i = 0; i < v->len; i++)
                kmed_buf_printf(&b, "%s%s", i ? "," : "", kmed_json_str(&v->kids[i], ""));
        } else {
            kmed_buf_puts(&b, kmed_json_str(v, ""));
        }
        if (b.len >= sizeof s->splits) {
            kmed_buf_free(&b);
            return kmed_error_set(err, KMED_ERR_LIMIT, file, 0, (size_t)-1, "'splits' too long");
        }
        if (b.data) memcpy(s->splits, b.data, b.len + 1);
        kmed_buf_free(&b);
    }
    s->weight = kmed_json_num(kmed_json_get(o, "weight"), 1.0);
    if (s->weight < 0 || s->weight != s->weight || s->weight > 1000)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "source %s: weight must be in [0, 1000]", s->path);
    if (s->weight == 0) s->weight = -1; /* explicit 0: drop everything by mixing */
    s->min_korean = kmed_json_num(kmed_json_get(o, "min_korean"), 0);
    s->strip_html = kmed_json_bool(kmed_json_get(o, "strip_html"), 0);
    s->no_explanation = !kmed_json_bool(kmed_json_get(o, "explanations"), 1);
    if ((v = kmed_json_get(o, "format"))) {
        const char *f = kmed_json_str(v, "");
        if (strcmp(f, "sft") == 0) s->format = KMED_DATA_FMT_SFT;
        else if (strcmp(f, "cpt") == 0) s->format = KMED_DATA_FMT_CPT;
        else if (strcmp(f, "both") == 0) s->format = KMED_DATA_FMT_BOTH;
        else if (strcmp(f, "auto") == 0) s->format = KMED_DATA_FMT_AUTO;
        else return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                                   "format '%s': expected sft, cpt, both or auto", f);
    }
    if ((v = kmed_json_get(o, "map"))) {
        if (v->type != KMED_JSON_OBJECT)
            return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                                  "'map' must be an object of dst: src");
        for (i = 0; i < v->len; i++) {
            char kv[128];
            snprintf(kv, sizeof kv, "%s=%s", v->kids[i].key, kmed_json_str(&v->kids[i], ""));
            if ((r = kmed_data_source_map(s, kv, err))) return r;
        }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_data_config_load(kmed_data_config *cfg, const char *path,
                                           kmed_error *err)
{
    char *data = NULL, dir[1024];
    size_t len, i;
    kmed_json_doc doc = {0};
    const kmed_json *root, *v, *w;
    kmed_result r;
    const char *slash = strrchr(path, '/');
    memset(cfg, 0, sizeof *cfg);
    if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    else dir[0] = 0;
    if ((r = kmed_file_read(path, (size_t)64 << 20, &data, &len, err))) return r;
    r = kmed_json_parse(&doc, data, len, path, 0, err);
    kmed_free(data);
    if (r) { kmed_json_free(&doc); return r; }
    root = doc.root;
    if (root->type != KMED_JSON_OBJECT) {
        r = kmed_error_set(err, KMED_ERR_FORMAT, path, 0, (size_t)-1, "expected a JSON object");
        goto done;
    }
    if ((v = kmed_json_get(root, "out")) &&
        (r = kmed__data_cfg_str(cfg->out_dir, sizeof cfg->out_dir, v, dir, "out", path, err)))
        goto done;
    cfg->seed = (uint64_t)kmed_json_num(kmed_json_get(root, "seed"), 0);
    if ((v = kmed_json_get(root, "val_fraction"))) { /* an explicit 0 means none */
        cfg->val_fraction = kmed_json_num(v, 0);
        if (cfg->val_fraction <= 0) cfg->val_fraction = -1;
    }
    cfg->min_chars = (size_t)kmed_json_num(kmed_json_get(root, "min_chars"), 0);
    cfg->max_chars = (size_t)kmed_json_num(kmed_json_get(root, "max_chars"), 0);
    cfg->pack.seq_len = (size_t)kmed_json_num(kmed_json_get(root, "seq_len"), 0);
    if ((v = kmed_json_get(root, "dedup"))) {
        cfg->dedup.no_exact = !kmed_json_bool(kmed_json_get(v, "exact"), 1);
        cfg->dedup.no_near = !kmed_json_bool(kmed_json_get(v, "near"), 1);
        cfg->dedup.threshold = kmed_json_num(kmed_json_get(v, "threshold"), 0);
        cfg->dedup.ngram = (int)kmed_json_num(kmed_json_get(v, "ngram"), 0);
        cfg->dedup.num_perm = (int)kmed_json_num(kmed_json_get(v, "num_perm"), 0);
        cfg->dedup.bands = (int)kmed_json_num(kmed_json_get(v, "bands"), 0);
    }
    if ((v = kmed_json_get(root, "decontam"))) {
        cfg->decontam.word_n = (int)kmed_json_num(kmed_json_get(v, "word_ngram"), 0);
        cfg->decontam.char_n = (int)kmed_json_num(kmed_json_get(v, "char_ngram"), 0);
        cfg->decontam.threshold = kmed_json_num(kmed_json_get(v, "threshold"), 0);
    }
    if ((v = kmed_json_get(root, "safety"))) {
        const char *act = kmed_json_str(kmed_json_get(v, "action"), "drop");
        if (strcmp(act, "drop") == 0) cfg->safety_action = 0;
        else if (strcmp(act, "flag") == 0) cfg->safety_action = 1;
        else if (strcmp(act, "off") == 0) cfg->safety_action = 2;
        else {
            r = kmed_error_set(err, KMED_ERR_FORMAT, path, 0, (size_t)-1,
                               "safety.action '%s': expected drop, flag or off", act);
            goto done;
        }
        cfg->safety_no_defaults = !kmed_json_bool(kmed_json_get(v, "defaults"), 1);
        if ((w = kmed_json_get(v, "lists")) && w->type == KMED_JSON_OBJECT) {
            cfg->safety_extra = (kmed_data_safety *)kmed__calloc(1, sizeof *cfg->safety_extra);
            if (!cfg->safety_extra) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
                goto done;
            }
            for (i = 0; i < w->len; i++) {
                const kmed_json *list = &w->kids[i];
                size_t k;
                for (k = 0; list->type == KMED_JSON_ARRAY && k < list->len; k++)
                    if ((r = kmed_data_safety_add(cfg->safety_extra, list->key,
                                                  kmed_json_str(&list->kids[k], ""), err)))
                        goto done;
            }
        }
    }
    if ((v = kmed_json_get(root, "disclaimer"))) {
        if (v->type == KMED_JSON_STRING) {
            cfg->disclaimer = 1;
            snprintf(cfg->disclaimer_text, sizeof cfg->disclaimer_text, "%s", v->str);
        } else {
            cfg->disclaimer = kmed_json_bool(v, 0);
        }
    }
    for (w = kmed_json_get(root, "sources"), i = 0; w && i < w->len; i++) {
        kmed_data_source *s;
        if ((r = kmed_data_config_add_source(cfg, 0, &s, err))) goto done;
        if ((r = kmed__data_cfg_source(s, &w->kids[i], dir, path, err))) goto done;
    }
    for (w = kmed_json_get(root, "eval"), i = 0; w && i < w->len; i++) {
        kmed_data_source *s;
        if ((r = kmed_data_config_add_source(cfg, 1, &s, err))) goto done;
        if ((r = kmed__data_cfg_source(s, &w->kids[i], dir, path, err))) goto done;
    }
done:
    kmed_json_free(&doc);
    if (r) kmed_data_config_free(cfg);
    return r;
}

/* One example in the spool file, 16 bytes: where it is and where it goes. */
typedef struct kmed__data_spooled {
    uint64_t off;
    uint32_t len;
    uint16_t src;
    uint8_t sft, val;
} kmed__data_spooled;

typedef struct kmed__data_run {
    const kmed_data_config *cfg;
    kmed_data_report *rep;
    const kmed_callbacks *cb;
    kmed_data_safety safety;
    kmed_data_dedup dedup;
    kmed_data_decontam decon;
    char **kept_ids; uint32_t *dups; size_t n_kept_ids, cap_kept_ids;  /* dedup items */
    unsigned char *dup_kind;                                         /* 1 exact, 2 near */
    FILE *spool; uint64_t spool_off;
    kmed__data_spooled *idx; size_t n_idx, cap_idx;
    kmed_afile drops;
    int drops_open;
    kmed_rng mix_rng;
    kmed_buf line, text, question;
} kmed__data_run;

static kmed_result kmed__data_drop_log(kmed__data_run *R, const char *id, const char *source,
                                       const char *stage, const char *reason, const char *detail,
                                       kmed_error *err)
{
    kmed_buf *b = &R->line;
    if (!R->drops_open) return KMED_OK;
    b->len = 0;
    kmed_buf_put(b, "{", 1);
    kmed__data_json_kv(b, "id", id);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "source", source);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "stage", stage);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "reason", reason);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "detail", detail);
    kmed_buf_puts(b, "}\n");
    if (b->failed) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return kmed_afile_write(&R->drops, b->data, b->len, err);
}

static kmed_result kmed__data_drop(kmed__data_run *R, kmed_data_source_report *sr,
                                   const char *id, kmed_data_drop why, const char *detail,
                                   kmed_error *err)
{
    sr->n_drop[why]++;
    return kmed__data_drop_log(R, id, sr->name, kmed_data_drop_stage(why),
                               kmed_data_drop_name(why), detail, err);
}

static kmed_result kmed__data_spool(kmed__data_run *R, const char *line, size_t n, size_t src,
                                    int sft, int val, kmed_error *err)
{
    kmed__data_spooled *e;
    if (n > 0xFFFFFFFFu) return KMED__ERR(err, KMED_ERR_LIMIT, "example over 4 GiB");
    if (R->n_idx == R->cap_idx) {
        size_t nc = R->cap_idx ? R->cap_idx * 2 : 1024;
        kmed__data_spooled *ni = (kmed__data_spooled *)KMED_REALLOC(R->idx, nc * sizeof *ni);
        if (!ni) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        R->idx = ni;
        R->cap_idx = nc;
    }
    if (fwrite(line, 1, n, R->spool) != n)
        return KMED__ERR(err, KMED_ERR_IO, "writing the spool file failed");
    e = &R->idx[R->n_idx++];
    e->off = R->spool_off;
    e->len = (uint32_t)n;
    e->src = (uint16_t)src;
    e->sft = (uint8_t)sft;
    e->val = (uint8_t)val;
    R->spool_off += n;
    return KMED_OK;
}

static size_t kmed__data_chars(const char *s, size_t n)
{
    size_t i, c = 0;
    for (i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

static int kmed__data_in_list(const char *list, const char *s)
{
    size_t n;
    if (!s) return 0;
    n = strlen(s);
    while (*list) {
        const char *c = strchr(list, ',');
        size_t l = c ? (size_t)(c - list) : strlen(list);
        if (l == n && memcmp(list, s, n) == 0) return 1;
        list += l + (c ? 1 : 0);
    }
    return 0;
}

/* Runs one record through every stage. */
static kmed_result kmed__data_one(kmed__data_run *R, size_t si, kmed_data_record *rec,
                                  kmed_error *err)
{
    const kmed_data_config *cfg = R->cfg;
    const kmed_data_source *src = &cfg->sources[si];
    kmed_data_source_report *sr = &R->rep->sources[si];
    size_t min_chars = cfg->min_chars ? cfg->min_chars : 8;
    size_t max_chars = cfg->max_chars ? cfg->max_chars : 20000;
    size_t chars, item, of;
    char detail[600];
    const char *cat, *phr;
    kmed_error e2;
    kmed_result r;
    int dup, hit, copies, c, val;
    double sim, w;
    kmed_data_format fmt = src->format;

    if (src->splits[0] && !kmed__data_in_list(src->splits, rec->split)) {
        snprintf(detail, sizeof detail, "split '%s' not in %s", rec->split ? rec->split : "",
                 src->splits);
        return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_SPLIT, detail, err);
    }
    memset(&e2, 0, sizeof e2);
    r = kmed_data_record_clean(rec, src->strip_html, &e2);
    if (r == KMED_ERR_FORMAT)
        return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_EMPTY, e2.msg, err);
    if (r) { if (err) *err = e2; return r; }
    if (src->no_explanation) {
        KMED_FREE(rec->explanation);
        rec->explanation = NULL;
    }
    R->text.len = 0;
    kmed_data_record_text(rec, &R->text);
    R->question.len = 0;
    kmed_data_record_question(rec, &R->question);
    if (R->text.failed || R->question.failed)
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    chars = kmed__data_chars(R->text.data, R->text.len);
    if (chars < min_chars || chars > max_chars) {
        snprintf(detail, sizeof detail, "%zu characters (limits %zu-%zu)", chars, min_chars,
                 max_chars);
        return kmed__data_drop(R, sr, rec->id, chars < min_chars ? KMED_DATA_DROP_TOO_SHORT
                                                                 : KMED_DATA_DROP_TOO_LONG,
                               detail, err);
    }
    if (src->min_korean > 0) {
        double k = kmed_data_korean_share(R->text.data, R->text.len);
        if (k < src->min_korean) {
            snprintf(detail, sizeof detail, "Hangul share %.2f < %.2f", k, src->min_korean);
            return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_NOT_KOREAN, detail, err);
        }
    }
    if (cfg->safety_action != 2 &&
        kmed_data_safety_check(&R->safety, R->text.data, R->text.len, &cat, &phr)) {
        snprintf(detail, sizeof detail, "%s: %s", cat, phr);
        if (cfg->safety_action == 0)
            return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_HARMFUL, detail, err);
        rec->flagged = 1;
        sr->n_flagged++;
        if ((r = kmed__data_drop_log(R, rec->id, sr->name, "safety", "flagged", detail, err)))
            return r;
    }
    hit = kmed_data_decontam_check(&R->decon, R->text.data, R->text.len, R->question.data,
                                   R->question.len, &item, &sim);
    if (hit) {
        if (hit == 3)
            snprintf(detail, sizeof detail, "near-duplicate of eval item %s (Jaccard ~%.2f)",
                     R->decon.ids[item], sim);
        else
            snprintf(detail, sizeof detail, "shares a %d-%s n-gram with eval item %s",
                     hit == 1 ? R->decon.cfg.word_n : R->decon.cfg.char_n,
                     hit == 1 ? "word" : "character", R->decon.ids[item]);
        return kmed__data_drop(R, sr, rec->id, hit == 3 ? KMED_DATA_DROP_CONTAM_NEAR
                                                        : KMED_DATA_DROP_CONTAM_NGRAM,
                               detail, err);
    }
    if (!cfg->dedup.no_exact || !cfg->dedup.no_near) {
        if ((r = kmed_data_dedup_check(&R->dedup, R->text.data, R->text.len, 1, &dup, &of, &sim,
                                       err)))
            return r;
        if (dup) {
            if (!R->dups[of]) R->dup_kind[of] = 0;
            R->dups[of]++;
            R->dup_kind[of] |= (unsigned char)dup;
            if (dup == 1) snprintf(detail, sizeof detail, "same text as %s", R->kept_ids[of]);
            else snprintf(detail, sizeof detail, "near-duplicate of %s (Jaccard ~%.2f)",
                          R->kept_ids[of], sim);
            return kmed__data_drop(R, sr, rec->id, dup == 1 ? KMED_DATA_DROP_EXACT_DUP
                                                            : KMED_DATA_DROP_NEAR_DUP,
                                   detail, err);
        }
        if (R->n_kept_ids == R->cap_kept_ids) {
            size_t nc = R->cap_kept_ids ? R->cap_kept_ids * 2 : 1024;
            char **ni = (char **)KMED_REALLOC(R->kept_ids, nc * sizeof *ni);
            uint32_t *nd;
            unsigned char *nk;
            if (ni) R->kept_ids = ni;
            nd = ni ? (uint32_t *)KMED_REALLOC(R->dups, nc * sizeof *nd) : NULL;
            if (nd) R->dups = nd;
            nk = nd ? (unsigned char *)KMED_REALLOC(R->dup_kind, nc) : NULL;
            if (nk) R->dup_kind = nk;
            if (!nk) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            R->cap_kept_ids = nc;
        }
        R->kept_ids[R->n_kept_ids] = kmed__data_strdup(rec->id);
        R->dups[R->n_kept_ids] = 0;
        R->dup_kind[R->n_kept_ids] = 0;
        if (!R->kept_ids[R->n_kept_ids]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        R->n_kept_ids++;
    }
    /* mixing: weight w gives floor(w) copies plus one more with probability frac(w) */
    w = src->weight == 0 ? 1.0 : (src->weight < 0 ? 0.0 : src->weight);
    copies = (int)floor(w);
    if (kmed_rng_uniform(&R->mix_rng) < w - floor(w)) copies++;
    if (copies == 0) {
        snprintf(detail, sizeof detail, "weight %.3g", w);
        return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_MIX, detail, err);
    }
    sr->n_kept++;
    /* the split follows the id, so a record keeps its side when sources change */
    {
        double vf = cfg->val_fraction == 0 ? 0.05 : cfg->val_fraction;
        uint64_t h = kmed_data_hash64(rec->id, strlen(rec->id), cfg->seed ^ 0x7a1u);
        val = vf > 0 && (double)(h >> 11) * (1.0 / 9007199254740992.0) < vf;
    }
    if (fmt == KMED_DATA_FMT_AUTO) fmt = rec->kind == KMED_DATA_DICT ? KMED_DATA_FMT_CPT
                                                                     : KMED_DATA_FMT_SFT;
    for (c = 0; c < 2; c++) {
        int sft = c == 0, k, n;
        if (sft && fmt == KMED_DATA_FMT_CPT) continue;
        if (!sft && fmt == KMED_DATA_FMT_SFT) continue;
        R->line.len = 0;
        if (sft) {
            const char *disc = NULL;
            if (cfg->disclaimer && cfg->disclaimer_text[0]) disc = cfg->disclaimer_text;
            else if (cfg->disclaimer)
                disc = kmed_data_disclaimer(kmed__data_is_korean(R->question.data));
            r = kmed_data_format_sft(rec, disc, &R->line, err);
        } else {
            r = kmed_data_format_cpt(rec, &R->line, err);
        }
        if (r) return r;
        n = val ? 1 : copies; /* the validation set is not up-weighted */
        for (k = 0; k < n; k++)
            if ((r = kmed__data_spool(R, R->line.data, R->line.len, si, sft, val, err))) return r;
        if (val) sr->n_examples_val += 1;
        else sr->n_examples_train += (size_t)n;
    }
    return KMED_OK;
}

static kmed_result kmed__data_load_evals(kmed__data_run *R, kmed_error *err)
{
    size_t i;
    kmed_data_record rec;
    memset(&rec, 0, sizeof rec);
    for (i = 0; i < R->cfg->n_evals; i++) {
        kmed_data_reader rd;
        kmed_result r = kmed_data_open(&rd, &R->cfg->evals[i], err);
        int eof = 0;
        if (r) return r;
        for (;;) {
            kmed_error e2;
            memset(&e2, 0, sizeof e2);
            r = kmed_data_next(&rd, &rec, &eof, &e2);
            if (r == KMED_ERR_FORMAT || r == KMED_ERR_LIMIT) {
                kmed_log(R->cb, KMED_LOG_WARN, "eval set: %s (skipped)", e2.msg);
                R->rep->n_errors++;
                continue;
            }
            if (r) { if (err) *err = e2; break; }
            if (eof) break;
            if (kmed_data_record_clean(&rec, 0, NULL) != KMED_OK) continue;
            R->text.len = 0;
            R->question.len = 0;
            if (rec.kind == KMED_DATA_MCQA || rec.kind == KMED_DATA_EXPQA) {
                /* question and options only: an explanation's stock phrases would flag
                   unrelated training text */
                int o;
                kmed_buf_puts(&R->text, rec.question);
                for (o = 0; o < rec.n_options; o++) kmed__data_line(&R->text, rec.options[o]);
            } else {
                kmed_data_record_text(&rec, &R->text);
            }
            kmed_data_record_question(&rec, &R->question);
            r = kmed_data_decontam_add(&R->decon, rec.id, R->text.data, R->text.len,
                                       R->question.data, R->question.len, err);
            if (r) break;
        }
        kmed_data_record_free(&rec);
        kmed_data_close(&rd);
        if (r) return r;
    }
    R->rep->n_eval_items = R->decon.n_items;
    return KMED_OK;
}

/* Output files, in the order of kmed_data_report.n_seqs: sft train/val, cpt train/val. */
static const char *const kmed__data_out_names[4] = {"sft_train", "sft_val", "cpt_train",
                                                    "cpt_val"};

static kmed_result kmed__data_write(kmed__data_run *R, kmed_error *err)
{
    const kmed_data_config *cfg = R->cfg;
    kmed_afile f[6], pf[4];
    kmed_data_packer pk[4];
    kmed_buf pbuf[4];
    kmed_rng rng;
    int opened = 0, popened = 0, k, pack = cfg->pack.encode != NULL;
    char path[1200], name[64];
    size_t i;
    kmed_result r = KMED_OK;
    memset(pk, 0, sizeof pk);
    memset(pbuf, 0, sizeof pbuf);
    /* seeded Fisher-Yates over the index; the spool itself stays in input order */
    kmed_rng_seed(&rng, cfg->seed);
    for (i = R->n_idx; i > 1; i--) {
        size_t j = (size_t)kmed_rng_below(&rng, i);
        kmed__data_spooled t = R->idx[i - 1];
        R->idx[i - 1] = R->idx[j];
        R->idx[j] = t;
    }
    for (k = 0; k < 6; k++) {
        snprintf(name, sizeof name, "%s.jsonl", k < 4 ? kmed__data_out_names[k]
                                                      : (k == 4 ? "train" : "val"));
        if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, name, err))) goto done;
        if ((r = kmed_afile_open(&f[k], path, err))) goto done;
        opened++;
    }
    for (k = 0; k < 4 && !pack; k++) { /* packed files of an earlier run would not match */
        snprintf(name, sizeof name, "%s_packed.jsonl", kmed__data_out_names[k]);
        if (kmed_path_join(path, sizeof path, cfg->out_dir, name, NULL) == KMED_OK) remove(path);
    }
    if (pack) {
        for (k = 0; k < 4; k++) {
            snprintf(name, sizeof name, "%s_packed.jsonl", kmed__data_out_names[k]);
            if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, name, err))) goto done;
            if ((r = kmed_data_pack_init(&pk[k], &cfg->pack, err))) goto done;
            if ((r = kmed_afile_open(&pf[k], path, err))) {
                kmed_data_pack_free(&pk[k]);
                goto done;
            }
            popened++;
        }
    }
    for (i = 0; i < R->n_idx; i++) {
        const kmed__data_spooled *e = &R->idx[i];
        int which = (e->sft ? 0 : 2) + (e->val ? 1 : 0);
        R->line.len = 0;
        kmed_buf_put(&R->line, NULL, 0);
        if (R->line.failed || !kmed__buf_reserve(&R->line, e->len)) {
            r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            goto done;
        }
        if (fseek(R->spool, (long)e->off, SEEK_SET) != 0 ||
            fread(R->line.data, 1, e->len, R->spool) != e->len) {
            r = KMED__ERR(err, KMED_ERR_IO, "reading the spool file failed");
            goto done;
        }
        R->line.len = e->len;
        R->line.data[e->len] = 0;
        if ((r = kmed_afile_write(&f[which], R->line.data, e->len, err))) goto done;
        if ((r = kmed_afile_write(&f[e->val ? 5 : 4], R->line.data, e->len, err))) goto done;
        if (which == 0) R->rep->n_sft_train++;
        else if (which == 1) R->rep->n_sft_val++;
        else if (which == 2) R->rep->n_cpt_train++;
        else R->rep->n_cpt_val++;
        if (pack) {
            kmed_json_doc doc = {0};
            r = kmed_json_parse(&doc, R->line.data, e->len, "spool", 0, err);
            if (!r) r = kmed_data_pack_add(&pk[which], doc.root, &pbuf[which], err);
            kmed_json_free(&doc);
            if (r) goto done;
            if (pbuf[which].len > ((size_t)1 << 20)) {
                if ((r = kmed_afile_write(&pf[which], pbuf[which].data, pbuf[which].len, err)))
                    goto done;
                pbuf[which].len = 0;
            }
        }
        if ((i & 1023) == 0) kmed_progress(R->cb, "data: writing", (double)i, (double)R->n_idx,
                                           "examples");
    }
    kmed_progress(R->cb, "data: writing", (double)R->n_idx, (double)R->n_idx, "examples");
    for (k = 0; k < popened; k++) {
        if ((r = kmed_data_pack_finish(&pk[k], &pbuf[k], err))) goto done;
        if (pbuf[k].len && (r = kmed_afile_write(&pf[k], pbuf[k].data, pbuf[k].len, err)))
            goto done;
        R->rep->n_seqs[k] = pk[k].n_seqs;
        R->rep->n_tokens[k] = pk[k].n_tokens;
        R->rep->n_trained[k] = pk[k].n_trained;
    }
    for (k = 0; k < popened; k++) if ((r = kmed_afile_commit(&pf[k], err))) goto done;
    popened = 0;
    for (k = 0; k < opened; k++) if ((r = kmed_afile_commit(&f[k], err))) goto done;
    opened = 0;
done:
    for (k = 0; k < opened; k++) kmed_afile_abort(&f[k]);
    for (k = 0; k < popened; k++) kmed_afile_abort(&pf[k]);
    for (k = 0; k < 4; k++) { kmed_data_pack_free(&pk[k]); kmed_buf_free(&pbuf[k]); }
    return r;
}

KMED_API kmed_result kmed_data_run(const kmed_data_config *cfg, kmed_data_report *rep,
                                   const kmed_callbacks *cb, kmed_error *err)
{
    kmed__data_run R;
    kmed_data_record rec;
    kmed_result r;
    char path[1200];
    size_t si, i, d;
    double t0 = kmed_time_now();
    memset(&R, 0, sizeof R);
    memset(&rec, 0, sizeof rec);
    memset(rep, 0, sizeof *rep);
    R.cfg = cfg;
    R.rep = rep;
    R.cb = cb;
    if (!cfg->out_dir[0]) return KMED__ERR(err, KMED_ERR_ARG, "no output directory");
    if (cfg->n_sources > 0xFFFF) return KMED__ERR(err, KMED_ERR_LIMIT, "too many sources");
    for (si = 0; si < cfg->n_sources; si++)
        if (cfg->sources[si].kind == KMED_DATA_DICT &&
            (cfg->sources[si].format == KMED_DATA_FMT_SFT ||
             cfg->sources[si].format == KMED_DATA_FMT_BOTH))
            return KMED__ERR(err, KMED_ERR_ARG, "source %s: a dictionary can only be cpt",
                             cfg->sources[si].path);
    rep->sources = (kmed_data_source_report *)kmed__calloc(cfg->n_sources ? cfg->n_sources : 1,
                                                           sizeof *rep->sources);
    if (!rep->sources) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    rep->n_sources = cfg->n_sources;
    for (si = 0; si < cfg->n_sources; si++) {
        kmed__data_source_name(&cfg->sources[si], rep->sources[si].name,
                               sizeof rep->sources[si].name);
        rep->sources[si].kind = cfg->sources[si].kind;
    }
    if ((r = kmed_mkdir_p(cfg->out_dir, err))) return r;
    if ((r = kmed_data_safety_init(&R.safety, !cfg->safety_no_defaults, err))) return r;
    for (i = 0; cfg->safety_extra && i < cfg->safety_extra->n; i++) {
        /* extra phrases are stored squashed already; squashing is idempotent */
        if ((r = kmed_data_safety_add(&R.safety, cfg->safety_extra->category[i],
                                      cfg->safety_extra->phrase[i], err)))
            goto done;
    }
    if ((r = kmed_data_dedup_init(&R.dedup, &cfg->dedup, err))) goto done;
    if ((r = kmed_data_decontam_init(&R.decon, &cfg->decontam, err))) goto done;
    kmed_rng_seed(&R.mix_rng, cfg->seed ^ 0x6d6978u);
    if ((r = kmed__data_load_evals(&R, err))) goto done;
    if (cfg->n_evals)
        kmed_log(cb, KMED_LOG_INFO, "decontaminating against %zu eval items", rep->n_eval_items);
    if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, ".spool.tmp", err))) goto done;
    R.spool = fopen(path, "w+b");
    if (!R.spool) {
        r = KMED__ERRF(err, KMED_ERR_IO, path, "cannot create the spool file");
        goto done;
    }
    if (!cfg->no_drop_log) {
        char dp[1200];
        if ((r = kmed_path_join(dp, sizeof dp, cfg->out_dir, "drops.jsonl", err))) goto done;
        if ((r = kmed_afile_open(&R.drops, dp, err))) goto done;
        R.drops_open = 1;
    }
    for (si = 0; si < cfg->n_sources; si++) {
        kmed_data_reader rd;
        kmed_data_source_report *sr = &rep->sources[si];
        char what[96];
        int eof = 0;
        snprintf(what, sizeof what, "data: %s", sr->name);
        if ((r = kmed_data_open(&rd, &cfg->sources[si], err))) goto done;
        for (;;) {
            kmed_error e2;
            memset(&e2, 0, sizeof e2);
            r = kmed_data_next(&rd, &rec, &eof, &e2);
            if (r == KMED_ERR_FORMAT || r == KMED_ERR_LIMIT) {
                char id[400];
                snprintf(id, sizeof id, "%s:%s:%zu", sr->name, rd.file, e2.line);
                kmed_log(cb, KMED_LOG_WARN, "%s (skipped)", e2.msg);
                rep->n_errors++;
                sr->n_in++;
                if ((r = kmed__data_drop(&R, sr, id, KMED_DATA_DROP_MALFORMED, e2.msg, err)))
                    break;
                continue;
            }
            if (r) { if (err) *err = e2; break; }
            if (eof) break;
            sr->n_in++;
            if ((r = kmed__data_one(&R, si, &rec, err))) break;
            if ((sr->n_in & 1023) == 0) kmed_progress(cb, what, (double)sr->n_in, 0, "records");
        }
        kmed_data_record_free(&rec);
        kmed_data_close(&rd);
        if (r) goto done;
        kmed_progress(cb, what, (double)sr->n_in, (double)sr->n_in, "records");
    }
    if (fflush(R.spool) != 0) { r = KMED__ERR(err, KMED_ERR_IO, "spool write failed"); goto done; }
    if ((r = kmed__data_write(&R, err))) goto done;
    for (i = 0; i < R.n_kept_ids; i++) {
        if (!R.dups[i]) continue;
        if (R.dup_kind[i] & 1) rep->exact_clusters++;
        if (R.dup_kind[i] & 2) rep->near_clusters++;
    }
    for (si = 0; si < rep->n_sources; si++) {
        kmed_data_source_report *sr = &rep->sources[si];
        size_t dropped = 0;
        rep->n_in += sr->n_in;
        rep->n_kept += sr->n_kept;
        for (d = 0; d < KMED_DATA_DROP_N; d++) {
            rep->n_drop[d] += sr->n_drop[d];
            dropped += sr->n_drop[d];
        }
        if (sr->n_in != sr->n_kept + dropped) {
            r = KMED__ERR(err, KMED_ERR_STATE, "source %s: %zu in but %zu kept + %zu dropped",
                          sr->name, sr->n_in, sr->n_kept, dropped);
            goto done;
        }
    }
    rep->seconds = kmed_time_now() - t0;
    if (R.drops_open) { R.drops_open = 0; if ((r = kmed_afile_commit(&R.drops, err))) goto done; }
    {
        kmed_buf b = {0};
        kmed_data_report_json(rep, &b);
        if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, "report.json", err)) == KMED_OK)
            r = kmed_file_write_atomic(path, b.data, b.len, err);
        b.len = 0;
        kmed_data_report_table(rep, &b);
        if (!r &&
            (r = kmed_path_join(path, sizeof path, cfg->out_dir, "report.txt", err)) == KMED_OK)
            r = kmed_file_write_atomic(path, b.data, b.len, err);
        kmed_buf_free(&b);
    }
done:
    if (R.drops_open) kmed_afile_abort(&R.drops);
    if (R.spool) {
        fclose(R.spool);
        if (kmed_path_join(path, sizeof path, cfg->out_dir, ".spool.tmp", NULL) == KMED_OK)
            remove(path);
    }
    for (i = 0; i < R.n_kept_ids; i++) KMED_FREE(R.kept_ids[i]);
    KMED_FREE(R.kept_ids);
    KMED_FREE(R.dups);
    KMED_FREE(R.dup_kind);
    KMED_FREE(R.idx);
    kmed_data_safety_free(&R.safety);
    kmed_data_dedup_free(&R.dedup);
    kmed_data_decontam_free(&R.decon);
    kmed_buf_free(&R.line);
    kmed_buf_free(&R.text);
    kmed_buf_free(&R.question);
    return r;
}

KMED_API void kmed_data_report_json(const kmed_data_report *rep, kmed_buf *out)
{
    size_t si;
    int d, k;
    kmed_buf_puts(out, "{\n  \"sources\": [");
    for (si = 0; si < rep->n_sources; si++) {
        const kmed_data_source_report *s = &rep->sources[si];
        size_t dropped = 0;
        kmed_buf_puts(out, si ? ",\n    {" : "\n    {");
        kmed__data_json_kv(out, "name", s->name);
        kmed_buf_put(out, ",", 1);
        kmed__data_json_kv(out, "kind", kmed_data_kind_name(s->kind));
        kmed_buf_printf(out, ",\"in\":%zu,\"kept\":%zu,\"dropped\":{", s->n_in, s->n_kept);
        for (d = 0; d < KMED_DATA_DROP_N; d++) {
            kmed_buf_printf(out, "%s\"%s\":%zu", d ? "," : "",
                            kmed_data_drop_name((kmed_data_drop)d), s->n_drop[d]);
            dropped += s->n_drop[d];
        }
        kmed_buf_printf(out, "},\"dropped_total\":%zu,\"flagged\":%zu,\"examples_train\":%zu,"
                        "\"examples_val\":%zu}", dropped, s->n_flagged, s->n_examples_train,
                        s->n_examples_val);
    }
    kmed_buf_printf(out, "\n  ],\n  \"totals\": {\"in\":%zu,\"kept\":%zu,\"dropped\":{",
                    rep->n_in, rep->n_kept);
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        kmed_buf_printf(out, "%s\"%s\":%zu", d ? "," : "",
                        kmed_data_drop_name((kmed_data_drop)d), rep->n_drop[d]);
    kmed_buf_printf(out, "}},\n  \"stages\": {");
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        kmed_buf_printf(out, "%s\"%s\":\"%s\"", d ? "," : "",
                        kmed_data_drop_name((kmed_data_drop)d),
                        kmed_data_drop_stage((kmed_data_drop)d));
    kmed_buf_printf(out, "},\n  \"dedup\": {\"exact_clusters\":%zu,\"near_clusters\":%zu,"
                    "\"exact_dropped\":%zu,\"near_dropped\":%zu},\n",
                    rep->exact_clusters, rep->near_clusters, rep->n_drop[KMED_DATA_DROP_EXACT_DUP],
                    rep->n_drop[KMED_DATA_DROP_NEAR_DUP]);
    kmed_buf_printf(out, "  \"decontam\": {\"eval_items\":%zu,\"ngram_dropped\":%zu,"
                    "\"near_dropped\":%zu},\n", rep->n_eval_items,
                    rep->n_drop[KMED_DATA_DROP_CONTAM_NGRAM],
                    rep->n_drop[KMED_DATA_DROP_CONTAM_NEAR]);
    kmed_buf_printf(out, "  \"examples\": {\"sft_train\":%zu,\"sft_val\":%zu,\"cpt_train\":%zu,"
                    "\"cpt_val\":%zu},\n  \"packed\": {", rep->n_sft_train, rep->n_sft_val,
                    rep->n_cpt_train, rep->n_cpt_val);
    for (k = 0; k < 4; k++)
        kmed_buf_printf(out, "%s\"%s\":{\"sequences\":%zu,\"tokens\":%zu,\"trained\":%zu}",
                        k ? "," : "", kmed__data_out_names[k], rep->n_seqs[k], rep->n_tokens[k],
                        rep->n_trained[k]);
    kmed_buf_printf(out, "},\n  \"errors\": %zu,\n  \"seconds\": %.3f\n}\n", rep->n_errors,
                    rep->seconds);
}

/* Width of a reason's column in the table: its name, at least 7. */
static int kmed__data_colw(kmed_data_drop d)
{
    int n = (int)strlen(kmed_data_drop_name(d));
    return n < 7 ? 7 : n;
}

KMED_API void kmed_data_report_table(const kmed_data_report *rep, kmed_buf *out)
{
    int used[KMED_DATA_DROP_N], d, k;
    size_t si;
    int w = 6;
    for (si = 0; si < rep->n_sources; si++)
        if ((int)strlen(rep->sources[si].name) > w) w = (int)strlen(rep->sources[si].name);
    for (d = 0; d < KMED_DATA_DROP_N; d++) used[d] = rep->n_drop[d] != 0;
    kmed_buf_printf(out, "%-*s %-12s %7s", w, "source", "kind", "in");
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        if (used[d]) kmed_buf_printf(out, " %*s", kmed__data_colw((kmed_data_drop)d),
                                     kmed_data_drop_name((kmed_data_drop)d));
    kmed_buf_printf(out, " %7s %7s %7s %7s\n", "kept", "flagged", "train", "val");
    for (si = 0; si <= rep->n_sources; si++) {
        const kmed_data_source_report *s = si < rep->n_sources ? &rep->sources[si] : NULL;
        size_t tr = 0, va = 0, fl = 0, j;
        if (!s) {
            for (j = 0; j < rep->n_sources; j++) {
                tr += rep->sources[j].n_examples_train;
                va += rep->sources[j].n_examples_val;
                fl += rep->sources[j].n_flagged;
            }
        }
        kmed_buf_printf(out, "%-*s %-12s %7zu", w, s ? s->name : "TOTAL",
                        s ? kmed_data_kind_name(s->kind) : "", s ? s->n_in : rep->n_in);
        for (d = 0; d < KMED_DATA_DROP_N; d++)
            if (used[d]) kmed_buf_printf(out, " %*zu", kmed__data_colw((kmed_data_drop)d),
                                         s ? s->n_drop[d] : rep->n_drop[d]);
        kmed_buf_printf(out, " %7zu %7zu %7zu %7zu\n", s ? s->n_kept : rep->n_kept,
                        s ? s->n_flagged : fl, s ? s->n_examples_train : tr,
                        s ? s->n_examples_val : va);
    }
    kmed_buf_puts(out, "stages:");
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        if (used[d]) kmed_buf_printf(out, " %s=%s", kmed_data_drop_name((kmed_data_drop)d),
                                     kmed_data_drop_stage((kmed_data_drop)d));
    kmed_buf_printf(out, "\ndedup clusters: %zu exact, %zu near; eval items: %zu; "
                    "malformed inputs: %zu\n", rep->exact_clusters, rep->near_clusters,
                    rep->n_eval_items, rep->n_errors);
    kmed_buf_printf(out, "examples written: sft %zu train / %zu val, cpt %zu train / %zu val\n",
                    rep->n_sft_train, rep->n_sft_val, rep->n_cpt_train, rep->n_cpt_val);
    for (k = 0; k < 4; k++)
        if (rep->n_seqs[k])
            kmed_buf_printf(out, "packed %-9s %6zu sequences, %9zu tokens, %9zu trained\n",
                            kmed__data_out_names[k], rep->n_seqs[k], rep->n_tokens[k],
                            rep->n_trained[k]);
}

KMED_API void kmed_data_report_free(kmed_data_report *rep)
{
    KMED_FREE(rep->sources);
    memset(rep, 0, sizeof *rep);
}
